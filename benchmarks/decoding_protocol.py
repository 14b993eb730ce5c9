"""Choose the headline decoding protocol on the tuning split, for the native row's sake.

    python benchmarks/decoding_protocol.py --run foxp2_runs/demo/gemma3_270m --targets es,hi

For each candidate ``generate()`` setting (greedy; repetition penalty; no-repeat n-gram), the
unsteered model is asked the *tuning* prompts in the target language (translated prompt and
template) and judged by the harness (DEFAULT without the NLL guard, which needs a steered
reference). Prints DEFAULT and the failure breakdown per language; the protocol that serves
both languages best is the headline one. The evaluation split is not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sae_train.config import ModelConfig
from sae_train.corpora.embedded import load_embedded_prompts
from sae_train.models.loading import load_model
from steering.evaluate.harness import EvalSettings, default_failures, generate
from steering.evaluate.judge import identifiers_for, judge_continuation
from steering.evaluate.native import native_prompts, native_template
from steering.language.token_sets import LanguageTokenSets

CANDIDATES = {"greedy": dict(), "rp1.15": dict(repetition_penalty=1.15),
              "rp1.3": dict(repetition_penalty=1.3), "nrng3": dict(no_repeat_ngram_size=3),
              "nrng4": dict(no_repeat_ngram_size=4),
              "rp1.15+nrng4": dict(repetition_penalty=1.15, no_repeat_ngram_size=4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--targets", default="es,hi")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help="comma-separated names from CANDIDATES")
    args = ap.parse_args()
    model, tok, _ = load_model(ModelConfig(name="demo:gemma3-270m", slug="gemma3-270m",
                                           dtype="auto"))
    tok.padding_side = "left"
    rows = load_embedded_prompts(["tuning"])
    table = {}
    for target in args.targets.split(","):
        sets = LanguageTokenSets.from_json(Path(args.run) / f"localise-{target}" / "localise"
                                           / "token_sets.json")
        ids = identifiers_for(target, "en")
        texts, _ = native_prompts(rows, target)
        for name in args.candidates.split(","):
            kw = CANDIDATES[name]
            settings = EvalSettings(max_new_tokens=args.max_new_tokens,
                                    template=native_template(target), **kw)
            gens = generate(model, tok, texts, None, sets, target, "en", settings)
            js = [judge_continuation(h, f, target, ids, settings.guards)
                  for h, f in zip(gens.heads, gens.fulls)]
            default = np.mean([dm > 0 and j.is_target_head and j.fluent
                               for dm, j in zip(gens.delta_m, js)])
            fails = default_failures(gens.delta_m, js, target, settings.guards)
            table[(target, name)] = {"default": float(default), "n": len(texts),
                                     "failures": fails}
            print(f"{target} {name:14s} DEFAULT {default:.3f} (n={len(texts)}) {fails}",
                  flush=True)
    print("\n| decoding | " + " | ".join(args.targets.split(",")) + " | min |")
    print("|---|" + "---|" * (len(args.targets.split(",")) + 1))
    for name in args.candidates.split(","):
        vals = [table[(t, name)]["default"] for t in args.targets.split(",")]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {min(vals):.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({f"{t}/{n}": v for (t, n), v in table.items()},
                                             indent=1))


if __name__ == "__main__":
    main()
