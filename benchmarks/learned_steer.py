"""Learned sparse steers on the demo model: supports × objectives, tuned and evaluated.

    python benchmarks/learned_steer.py --run /work/runs/demo/gemma3_270m --target hi \
        --supports traced_window,traced_layers,random_window,dense_window --out /tmp/ls-hi

Reads a finished demo run (cache + localise-<t>), builds the teacher answers (the model's own
native answers to the discovery and tuning prompts, judged), learns a shift on each support,
picks γ on the tuning split (guarded DEFAULT, KL ≤ budget) and evaluates on the evaluation
split with the steer stage's harness, next to the native row. Prints a table; writes
results.json. The evaluation split is used for evaluation only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from sae_train.config import ModelConfig
from sae_train.corpora.embedded import load_embedded_prompts
from sae_train.models.loading import load_model
from steering.steer.localisation import Localisation
from steering.evaluate.harness import (EvalSettings, HeldOutText, evaluate_method, generate,
                               guarded_default, language_nll_offset, sentence_scores)
from steering.evaluate.judge import identifiers_for
from steering.steer.learned import HeldOutKL, LearnConfig, learn_steer
from steering.evaluate.native import native_prompts, native_template
from steering.evaluate.pipeline import _subset, split_sentences
from steering.evaluate.teacher import teacher_answers
from steering.steer.supports import build_support, neuron_scales
from steering.language.token_sets import LanguageTokenSets


def traced_layers(loc: Localisation) -> list[int]:
    return [l for l in loc.layers
            if loc.t(l, "target_neurons").numel() + loc.t(l, "english_neurons").numel() > 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--supports", default="traced_window")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repetition-penalty", type=float, default=1.3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--l1-weight", type=float, default=0.002)
    ap.add_argument("--first-weight", type=float, default=4.0)
    ap.add_argument("--sustain", type=float, default=0.33)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--gammas", default="0.5,1.0,1.5")
    ap.add_argument("--kl-budget", type=float, default=0.1)
    ap.add_argument("--n-tune", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--layers", default="")
    ap.add_argument("--skip-native", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run)
    target = args.target
    loc = Localisation(run / f"localise-{target}")
    sets = LanguageTokenSets.from_json(run / f"localise-{target}" / "localise" / "token_sets.json")
    model, tok, info = load_model(ModelConfig(name="demo:gemma3-270m", slug="gemma3-270m",
                                              dtype="auto"))
    tok.padding_side = "left"
    print(f"model dtype {next(model.parameters()).dtype}; window {loc.window}; traced layers "
          f"{traced_layers(loc)}", flush=True)
    settings = EvalSettings(steps=3, max_new_tokens=24, batch_size=16, gen_batch_size=64,
                            n_boot=1000, seed=0, repetition_penalty=args.repetition_penalty)
    ids = identifiers_for(target, "en")
    cache_dir = run / "cache"
    tune_rows = _subset(load_embedded_prompts(["tuning"]), args.n_tune, 0)
    eval_rows = _subset(load_embedded_prompts(["evaluation"]), args.n_eval, 0)
    tune_sents = HeldOutText(model, tok, _subset(split_sentences(cache_dir, target, "tuning"),
                                                 16, 0), 16)
    eval_sents = HeldOutText(model, tok, _subset(split_sentences(cache_dir, target,
                                                                 "evaluation"), 32, 0), 16)
    en_sents = _subset(split_sentences(cache_dir, "en", "evaluation"), 32, 0)
    offset = language_nll_offset(model, tok, eval_sents, en_sents, 16)
    results: dict = {"target": target, "rp": args.repetition_penalty, "offset": offset,
                     "dtype": str(next(model.parameters()).dtype), "args": vars(args)}

    t0 = time.perf_counter()
    teacher_rows = load_embedded_prompts(["discovery", "tuning"])
    teacher, tsum = teacher_answers(model, tok, teacher_rows, target=target, english="en",
                                    native_template=native_template(target), token_sets=sets,
                                    settings=settings, identifiers=ids,
                                    cache_file=out / "teacher.json",
                                    model_key=json.dumps(info.to_dict(), sort_keys=True,
                                                         default=str))
    # the tuning prompts are selection data: learn from the discovery ones only
    tune_ids = {p.id for p in tune_rows}
    teacher_train = [e for e in teacher if e.prompt_id not in tune_ids]
    results["teacher"] = {**tsum, "train": len(teacher_train), "seconds_total":
                          time.perf_counter() - t0}
    print("teacher", json.dumps(results["teacher"], ensure_ascii=False)[:600], flush=True)

    ref_metrics, ref_gens = evaluate_method(model, tok, None, target=target, english="en",
                                            prompts=[p.text for p in eval_rows],
                                            sentences=eval_sents, token_sets=sets,
                                            settings=settings, identifiers=ids)
    results["none"] = {"default": ref_metrics["default"]["mean"]}
    if not args.skip_native:
        texts, _ = native_prompts(eval_rows, target)
        nat, _ = evaluate_method(model, tok, None, target=target, english="en", prompts=texts,
                                 sentences=eval_sents, token_sets=sets,
                                 settings=dataclasses.replace(
                                     settings, template=native_template(target)),
                                 identifiers=ids)
        results["native"] = _row(nat)
        print("native", results["native"], flush=True)

    layers_all = traced_layers(loc)
    disc_texts = (split_sentences(cache_dir, target, "discovery")[:48]
                  + split_sentences(cache_dir, "en", "discovery")[:48])
    wanted_layers = sorted(set(loc.window) | set(layers_all) | set(range(len(loc.layers))))
    scales = neuron_scales(model, tok, disc_texts, wanted_layers)
    kl_text = HeldOutKL(model, [tok(s)["input_ids"] for s in
                                split_sentences(cache_dir, target, "discovery")[48:112]],
                        pad_id=tok.pad_token_id or 0)
    for name in args.supports.split(","):
        kind, where = name.split("_")
        layers = {"window": loc.window, "layers": layers_all,
                  "custom": [int(x) for x in args.layers.split("-")] if args.layers else []
                  }[where]
        support = build_support(kind, loc, layers, scales, seed=0)
        cfg = LearnConfig(steps=args.steps, lr=args.lr, kl_weight=args.kl_weight,
                          l1_weight=args.l1_weight, first_weight=args.first_weight)
        res = learn_steer(model, support, teacher_train, kl_text, cfg, target=target,
                          english="en", method=f"learned_{name}", decode_steps=args.decode_steps,
                          sustain=args.sustain, pad_id=tok.pad_token_id or 0)
        res.artifact.save(out / f"learned_{name}", model=model, tokenizer=tok)
        # γ on the tuning split: guarded DEFAULT among points with KL(gen) within budget
        best = None
        for g in [float(x) for x in args.gammas.split(",")]:
            gens = generate(model, tok, [p.text for p in tune_rows], res.artifact, sets, target,
                            "en", settings, gamma=g)
            dflt = guarded_default(gens, target, ids, settings.guards)
            kl = float(np.nanmean(sentence_scores(model, tok, tune_sents, res.artifact,
                                                  gamma=g, batch_size=16).kl["gen"]))
            print(f"  {name} γ={g}: tuning DEFAULT {dflt:.3f} KL {kl:.3f}", flush=True)
            if kl <= args.kl_budget and (best is None or dflt > best[1]):
                best = (g, dflt, kl)
        gamma = best[0] if best else min(float(x) for x in args.gammas.split(","))
        metrics, _ = evaluate_method(model, tok, res.artifact, target=target, english="en",
                                     prompts=[p.text for p in eval_rows], sentences=eval_sents,
                                     token_sets=sets, settings=settings, reference=ref_gens,
                                     identifiers=ids, gamma=gamma, nll_offset=offset)
        results[name] = {**_row(metrics), "gamma": gamma, "support": support.size,
                         "nonzero": res.n_nonzero, "train_seconds": res.seconds,
                         "final_nll": res.history[-1]["nll"], "final_kl": res.history[-1]["kl"],
                         "tuning": best}
        print(name, results[name], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str,
                                                     ensure_ascii=False))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str,
                                                 ensure_ascii=False))


def _row(m: dict) -> dict:
    return {"default": m["default"]["mean"], "ci": [m["default"]["low"], m["default"]["high"]]
            if "low" in m["default"] else m["default"].get("ci"),
            "kl_gen": m["kl_gen"]["mean"], "nll_change_gen": m["nll_change_gen"]["mean"],
            "failures": m["default_failures"], "lid_first_line": m["lid_first_line"]["mean"]
            if isinstance(m["lid_first_line"], dict) else m["lid_first_line"],
            "examples": [e["continuation"][:80] for e in m["examples"][:3]]}


if __name__ == "__main__":
    main()
