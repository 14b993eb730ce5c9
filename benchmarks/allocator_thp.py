"""The steering harness's full-vocabulary work with and without huge pages for torch's allocator.

    python benchmarks/allocator_thp.py                        # demo model, 48 prompts
    python benchmarks/allocator_thp.py --model tiny_llama     # smoke run (seconds)

Each row is a fresh child process (``THP_MEM_ALLOC_ENABLE`` is read once, at torch's first
allocation, so it cannot be switched inside one process); rounds alternate the two settings.
The timed work is what every method's evaluation repeats (steering.evaluate.harness): greedy
generation of ``max_new_tokens`` tokens on the evaluation prompts, the continuation NLL of
those answers, and the held-out sentences' full-vocabulary log-probs. Printed per setting: the
median wall time, system (kernel) time and minor page faults of the timed part, and the
largest difference of the results between the two settings (0: the same arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(model_name: str, n_prompts: int, n_sentences: int, max_new_tokens: int) -> dict:
    import torch

    from sae_train.corpora.embedded import load_embedded_prompts, load_prompt_translations
    from steering import api
    from steering.evaluate.harness import (EvalSettings, HeldOutText, continuation_nll,
                                           generate, sentence_scores)
    from steering.language.token_sets import build_language_token_sets

    model, tokenizer, _ = api.load_model(f"model={model_name}")
    tokenizer.padding_side = "left"
    prompts = [p.text for p in load_embedded_prompts(["evaluation"])][:n_prompts]
    spanish = load_prompt_translations("es")
    sentences = [spanish[p.id] for p in load_embedded_prompts(["tuning"]) if p.id in spanish]
    sentences = sentences[:n_sentences]
    sets = build_language_token_sets(tokenizer, {"en": prompts, "es": sentences}, ["en", "es"],
                                     use_wordfreq=False, min_count=1)
    settings = EvalSettings(max_new_tokens=max_new_tokens)
    torch.manual_seed(0)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    gens = generate(model, tokenizer, prompts, None, sets, "es", "en", settings)
    nll = continuation_nll(model, tokenizer, prompts, gens.new_ids, 0, settings.template,
                           settings.batch_size)
    text = HeldOutText(model, tokenizer, sentences, settings.batch_size, keep_base=False)
    held = [float(v) for v in sentence_scores(model, tokenizer, text, None, modes=()).nll_base]
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"wall": wall, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt,
            "values": [float(v) for v in nll] + held + [float(v) for v in gens.delta_m]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.prompts, args.sentences, args.max_new_tokens)))
        return
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--prompts",
           str(args.prompts), "--sentences", str(args.sentences), "--max-new-tokens",
           str(args.max_new_tokens)]
    runs: dict[str, list[dict]] = {"4 KiB pages (glibc default)": [], "huge pages (THP)": []}
    for _ in range(args.rounds):
        for label, value in zip(runs, ("0", "1")):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    from sae_train.models.loading import cpu_has_native_bf16

    cpu = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no native bf16"
    print(f"model {args.model}, {args.prompts} prompts × {args.max_new_tokens} new tokens, "
          f"{args.sentences} held-out sentences; CPU {cpu}, {os.cpu_count()} cores; "
          f"medians of {args.rounds} rounds")
    print(f"| allocator | wall s | system s | minor page faults |\n|---|---|---|---|")
    for label, rs in runs.items():
        print(f"| {label} | {statistics.median(r['wall'] for r in rs):.1f} | "
              f"{statistics.median(r['sys'] for r in rs):.1f} | "
              f"{statistics.median(r['faults'] for r in rs):,.0f} |")
    a, b = (rs[0]["values"] for rs in runs.values())
    diff = max((abs(x - y) for x, y in zip(a, b) if x == x and y == y), default=0.0)
    print(f"largest difference of the results between the settings: {diff:.3g}")


if __name__ == "__main__":
    main()
