"""Probe a target on the *whole tuning split*: prompt variants and learned-steer variants.

    # which prompts make the unsteered model answer an English question in the target language
    python benchmarks/tuning_split_probe.py --run foxp2_runs/demo/gemma3_270m --target hi \
        --templates 'Question: {prompt}\\nउत्तर:' 'Question: {prompt}\\nAnswer: यह'
    # learned-steer variants (foxp2-steer overrides on top of the demo's), each at several γ
    python benchmarks/tuning_split_probe.py --run foxp2_runs/demo/gemma3_270m --target hi \
        --variant base= --variant lr01=learn.lr=0.1 --variant all=position=all \
        --gammas 1.0,1.5,2.0

Reads a finished demo run (cache, localise-<t>, and steer-<t>/work/teacher.json when present,
so the teacher answers are not generated again), composes foxp2-steer's config with the demo's
steer overrides plus each variant's, trains ``foxp2_learned`` once per variant on the discovery
split, and scores every template / (variant, γ) on all 66 tuning prompts with the steer stage's
harness and relevance guard (τ calibrated as in the pipeline). DEFAULT there includes the
relevance guard. The evaluation split is never read: this is where settings are chosen.
Prints one line per row (DEFAULT, relevance, KL, ΔNLL and the failure rates); writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from sae_train.corpora.embedded import load_embedded_prompts, load_prompt_translations
from steering import api
from steering.evaluate import pipeline
from steering.evaluate.config import SteerAppConfig
from steering.evaluate.harness import evaluate_method
from steering.steer.methods.learned import build_learned


def demo_steer_overrides() -> list[str]:
    """The steer overrides conf/demo.yaml passes to foxp2-steer (shared by fast and full)."""
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "demo.yaml")
    return [str(o) for o in conf.steer]


def row(name: str, metrics: dict, seconds: float) -> dict:
    fails = {k: round(v, 2) for k, v in metrics["default_failures"].items() if v}
    out = {"name": name, "default": metrics["default"]["mean"],
           "relevance": metrics.get("relevance", {}).get("mean"),
           "kl_gen": metrics["kl_gen"]["mean"], "nll_change_gen": metrics["nll_change_gen"]["mean"],
           "failures": fails, "seconds": seconds,
           "examples": [e["continuation"] for e in metrics["examples"][:3]]}
    rel = "n/a" if out["relevance"] is None else f"{out['relevance']:.2f}"
    print(f"{name:<34} DEFAULT {out['default']:.2f}  relevant {rel}  KL {out['kl_gen']:.3f}  "
          f"ΔNLL {out['nll_change_gen']:+.3f}  fails {fails}  ({seconds:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished demo run (…/demo/<model>)")
    ap.add_argument("--target", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--templates", nargs="*", default=[],
                    help="prompt templates with {prompt} (the English question), unsteered")
    ap.add_argument("--variant", action="append", default=[],
                    help="name=override[,override…] (foxp2-steer keys); 'base=' for none")
    ap.add_argument("--gammas", default="1.0,1.5,2.0")
    ap.add_argument("--out", default=None, help="folder for the JSON and artifacts")
    args = ap.parse_args()

    run_dir, t = Path(args.run), args.target
    out = Path(args.out or f"/tmp/tuning_probe_{t}")
    (out / "work").mkdir(parents=True, exist_ok=True)
    teacher = run_dir / f"steer-{t}" / "work" / "teacher.json"
    if teacher.is_file():
        shutil.copy(teacher, out / "work" / "teacher.json")
    common = [f"model={args.model}", f"target={t}", f"cache_dir={run_dir / 'cache'}",
              f"localise_dir={run_dir / f'localise-{t}'}", f"out_dir={out}",
              *demo_steer_overrides(), "progress=false"]
    cfg = pipeline.as_config(api.compose_config("steer", *common), SteerAppConfig)
    run = pipeline.start_run(cfg, None)
    splits = pipeline.load_splits(run)
    relevance = pipeline.calibrate_relevance(run)
    prompts = [p.text for p in load_embedded_prompts(["tuning"])]
    table = load_prompt_translations(t)
    results = []

    def score(name, artifact, prompts_, settings):
        t0 = time.perf_counter()
        metrics, _ = evaluate_method(run.model, run.tokenizer, artifact, target=t,
                                     english=cfg.english, prompts=prompts_,
                                     sentences=splits.tune_sents, token_sets=run.sets,
                                     settings=settings, identifiers=run.identifiers,
                                     relevance=relevance)
        results.append(row(name, metrics, time.perf_counter() - t0))

    rows = load_embedded_prompts(["tuning"])
    native = [table[p.id] for p in rows if p.id in table]
    score("native (asked in the target)", None, native,
          dataclasses.replace(run.settings, template=relevance.template))
    score("none", None, prompts, run.settings)
    for template in args.templates:
        score(f"template {template!r}", None, prompts,
              dataclasses.replace(run.settings, template=template.replace("\\n", "\n")))

    gammas = [float(g) for g in args.gammas.split(",")]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        extra = [o for o in overrides.split(",") if o]
        vcfg = pipeline.as_config(api.compose_config("steer", *common, *extra), SteerAppConfig)
        vrun = dataclasses.replace(run, cfg=vcfg)
        t0 = time.perf_counter()
        art = build_learned(pipeline.build_request(vrun), "foxp2_learned")
        art.save(out / "artifacts" / name)
        print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s, "
              f"{art.provenance.get('nonzero')} neurons on", flush=True)
        for g in gammas:
            score(f"{name} γ={g:g}", art.with_strengths(lam=g, beta=0.0, gamma=1.0), prompts,
                  run.settings)
    (out / "probe.json").write_text(json.dumps({"target": t, "rows": results}, indent=1,
                                               ensure_ascii=False))
    print(f"→ {out / 'probe.json'}")


if __name__ == "__main__":
    main()
