"""How stable is the relevance guard's τ? The 5% quantile of native PMI from 16 answers vs more.

    python benchmarks/relevance_threshold.py                          # demo model, hi and es, bf16 + float32
    python benchmarks/relevance_threshold.py --model tiny_llama --dtypes float32 --draws 50   # smoke

For each target and model dtype, the unsteered model answers every tuning question (66) and
every discovery question (132) in the target language (its native template, the demo's
greedy + no-repeat-3-gram decoding, 24 new tokens); each answer's relevance PMI is computed
as the guard computes it (K = 4 other questions of the same split). Printed per row: τ (the
5% quantile) over all tuning answers, over all discovery answers, and the mean ± sd of τ over
``--draws`` random draws of 16 tuning answers (the sample the steer stage used before
``evaluation.relevance_prompts``), with the share of discovery answers each τ keeps.

The draws reuse the PMIs computed against the 66-question list; a real 16-prompt run compares
each answer with 4 of its own 16 questions, which moves each PMI a little more.
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--targets", nargs="+", default=["hi", "es"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--quantile", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from sae_train.corpora.embedded import load_embedded_prompts
    from steering import api
    from steering.evaluate.harness import EvalSettings, generate
    from steering.evaluate.native import native_prompts, native_template
    from steering.evaluate.relevance import RelevanceSettings, relevance_pmi
    from steering.language.token_sets import LanguageTokenSets

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    q = args.quantile
    print(f"{'target':6} {'dtype':9} {'τ tuning (all)':>15} {'τ discovery':>12} "
          f"{f'τ of {args.sample} (mean ± sd)':>22} {'disc. kept at τ all / τ mean±sd':>34} "
          f"{'seconds':>8}")
    for dtype in args.dtypes:
        model, tokenizer, _ = api.load_model(f"model={args.model}", f"model.dtype={dtype}")
        tokenizer.padding_side = "left"
        vocab = model.get_output_embeddings().weight.shape[0]
        for target in args.targets:
            started = time.perf_counter()
            # ΔM is not used here: any two disjoint sets do
            sets = LanguageTokenSets.from_ids({target: [1], "en": [2]}, vocab)
            template = native_template(target, None)
            decoding = dataclasses.replace(EvalSettings(max_new_tokens=24), template=template,
                                           no_repeat_ngram_size=3)
            pmi = {}
            for split in ("tuning", "discovery"):
                questions, _ = native_prompts(load_embedded_prompts([split]), target)
                answers = generate(model, tokenizer, questions, None, sets, target, "en",
                                   decoding).new_ids
                values = relevance_pmi(model, tokenizer, questions, answers, template,
                                       RelevanceSettings(n_others=4, max_tokens=24))
                pmi[split] = values[np.isfinite(values)]
            tuning, discovery = pmi["tuning"], pmi["discovery"]
            tau_all = float(np.quantile(tuning, q))
            draws = np.array([np.quantile(rng.choice(tuning, args.sample, replace=False), q)
                              for _ in range(args.draws)])
            kept = [float(np.mean(discovery >= t))
                    for t in (tau_all, draws.mean() - draws.std(), draws.mean() + draws.std())]
            print(f"{target:6} {dtype:9} {tau_all:15.3f} {np.quantile(discovery, q):12.3f} "
                  f"{draws.mean():14.3f} ± {draws.std():5.3f} "
                  f"{kept[0]:15.2f} / {kept[1]:.2f}–{kept[2]:.2f} "
                  f"{time.perf_counter() - started:8.0f}")


if __name__ == "__main__":
    main()
