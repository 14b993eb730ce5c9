"""The relevance guard's PMI: each question's prompt run once for its K + 1 answers vs one row per pair.

    python benchmarks/relevance_pmi.py                      # demo model, Hindi and Spanish
    python benchmarks/relevance_pmi.py --model tiny_llama   # smoke run (seconds)

For each target, the unsteered model's native answers to ``--prompts`` tuning questions (asked
in the target language, ``--tokens`` new tokens, the demo's no-repeat 3-gram decoding) are
scored as the relevance guard scores them (K = 4 other questions per answer):

* shared: :func:`steering.evaluate.relevance.relevance_pmi` — each question's prompt runs
  once and its KV cache serves the K + 1 answers scored after it;
* reference: the same PMI from K + 1 calls of ``continuation_nll`` (one left-padded row per
  (question, answer) pair, the prompt recomputed in every row; the code before the shared
  prompt).

Printed: best-of-``--repeats`` seconds of each, the speed-up, the largest |ΔPMI| and whether
the τ that the two give (5% quantile) differs.
"""

from __future__ import annotations

import argparse
import dataclasses

from timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--targets", nargs="+", default=["hi", "es"])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="the model's dtype (auto: as the demo)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from sae_train.corpora.embedded import load_embedded_prompts
    from steering import api
    from steering.evaluate.harness import EvalSettings, continuation_nll, generate
    from steering.evaluate.native import native_prompts, native_template
    from steering.evaluate.relevance import RelevanceSettings, relevance_pmi
    from steering.language.token_sets import LanguageTokenSets

    torch.set_num_threads(args.threads)
    model, tokenizer, info = api.load_model(f"model={args.model}", f"model.dtype={args.dtype}")
    tokenizer.padding_side = "left"
    settings = RelevanceSettings(n_others=4, max_tokens=args.tokens)
    print(f"model {args.model} ({next(model.parameters()).dtype}), {args.threads} thread(s), "
          f"{args.prompts} answers × {args.tokens} tokens, K = {settings.n_others}")
    print(f"{'target':6} {'reference s':>12} {'shared s':>9} {'speed-up':>9} "
          f"{'max |ΔPMI|':>11} {'τ ref':>7} {'τ shared':>9}")
    for target in args.targets:
        template = native_template(target, None)
        questions, _ = native_prompts(load_embedded_prompts(["tuning"]), target)
        questions = questions[:args.prompts]
        # token sets only feed ΔM, which is not measured here: any two disjoint id sets do
        sets = LanguageTokenSets.from_ids({target: [1], "en": [2]},
                                          model.get_output_embeddings().weight.shape[0])
        decoding = dataclasses.replace(EvalSettings(max_new_tokens=args.tokens),
                                       template=template, no_repeat_ngram_size=3)
        answers = generate(model, tokenizer, questions, None, sets, target, "en",
                           decoding).new_ids

        def reference():
            n, cut = len(questions), [a[:args.tokens] for a in answers]
            own = continuation_nll(model, tokenizer, questions, cut, 0, template)
            others = np.stack([continuation_nll(model, tokenizer,
                                                [questions[(i + k) % n] for i in range(n)],
                                                cut, 0, template)
                               for k in range(1, settings.n_others + 1)])
            return others.mean(0) - own

        def shared():
            return relevance_pmi(model, tokenizer, questions, answers, template, settings)

        t_ref, pmi_ref = best_of(reference, args.repeats)
        t_new, pmi_new = best_of(shared, args.repeats)
        tau = [float(np.nanquantile(v, 0.05)) for v in (pmi_ref, pmi_new)]
        print(f"{target:6} {t_ref:12.2f} {t_new:9.2f} {t_ref / t_new:8.2f}× "
              f"{float(np.nanmax(np.abs(pmi_ref - pmi_new))):11.2e} {tau[0]:7.3f} {tau[1]:9.3f}")


if __name__ == "__main__":
    main()
