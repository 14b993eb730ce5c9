"""Neural FOXP2 stage III for one target: build → tune → evaluate every method → report.

:func:`run_steer` is what ``foxp2-steer`` (:mod:`steering.apps.steer_app`) runs; settings are
:class:`steering.evaluate.config.SteerAppConfig`. Splits (never mixed): the localisation used the
**discovery** split; (λ, β) are tuned on the **tuning** split (prompts and target sentences);
every number of the report comes from the **evaluation** split.

Outputs under ``out_dir``::

    artifacts/<method>/{steer.safetensors, steer.json}   tuned, loadable by steer() / foxp2-generate
    report/report.{json,md}, report/plots/*.png         the table with CIs, frontier, γ plots
    work/<method>.json                                   finished methods (reused on re-run)

Interrupted runs lose at most the method in progress: each finished method is written to
``work/`` with a key of its inputs and settings and reused when the key matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sae_train.corpora.embedded import load_embedded_prompts
from steering.steer.artifact import SteeringArtifact
from steering.steer.build import TUNED, Localisation, build_method, residual_mean_differences
from steering.evaluate.config import SteerAppConfig
from steering.evaluate.harness import (EvalSettings, HeldOutText, TuningPoint, best_point,
                               evaluate_method, generate, guarded_default, language_nll_offset,
                               sentence_scores, tune_strengths)
from steering.evaluate.judge import identifiers_for
from steering.evaluate.native import native_prompts, native_template
from steering.evaluate.report import write_report
from steering.language.token_sets import LanguageTokenSets

log = logging.getLogger("foxp2-steer")

# The bars on the demo model, for the primary method (gen-position NLL change).
BARS = {"es": {"default": 0.95, "nll_change_gen": 0.05},
        "hi": {"default": 0.90, "nll_change_gen": 0.15, "script_fraction": 0.8}}


class SteerError(ValueError):
    """Inputs that cannot give a steer (names what is missing)."""


def _subset(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in idx]


def split_sentences(cache_dir: str | Path, target: str, split: str) -> list[str]:
    """Target-language texts of one split from the cache's documents.jsonl."""
    path = Path(cache_dir) / "documents.jsonl"
    if not path.is_file():
        raise SteerError(f"{path} is missing: the activation cache holds the corpus splits")
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            if d.get("language") == target and d.get("split") == split:
                out.append(d["text"])
    if not out:
        raise SteerError(f"no {target} documents of split {split!r} in {path}")
    return out


def _ablation_of(cfg: SteerAppConfig) -> str:
    """foxp2_pos / foxp2_neg ablate the primary FOXP2 mode (feature mode otherwise)."""
    return cfg.primary if cfg.primary in ("foxp2", "foxp2_neurons") else "foxp2"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_bars(target: str, metrics: dict, method: str) -> list[dict]:
    out = []
    for key, bound in BARS.get(target, {}).items():
        value = metrics[key]["mean"]
        met = value >= bound if key in ("default", "script_fraction") else value <= bound
        rel = "≥" if key in ("default", "script_fraction") else "≤"
        out.append({"method": method, "metric": key, "value": value, "bound": bound, "met": met,
                    "text": f"{method}: {key} = {value:.3f} ({rel} {bound})"})
    return out


def run_steer(cfg, model_bundle: tuple | None = None) -> dict:
    """Run stage III for ``cfg`` (a :class:`SteerAppConfig` or the app's DictConfig)."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from sae_train.models.loading import load_model

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    if not isinstance(cfg, SteerAppConfig):
        raise TypeError(f"cfg must be a SteerAppConfig; got {type(cfg).__name__}")
    started = time.perf_counter()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    loc = Localisation(cfg.localise_dir)
    if loc.target != cfg.target:
        raise SteerError(f"{cfg.localise_dir} localised {loc.target!r}, not target={cfg.target!r}")
    sets = LanguageTokenSets.from_json(Path(cfg.localise_dir) / "localise" / "token_sets.json")
    model, tokenizer, info = model_bundle if model_bundle is not None else load_model(cfg.model)
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"

    ev = cfg.evaluation
    settings = EvalSettings(steps=ev.steps, max_new_tokens=ev.max_new_tokens,
                            batch_size=ev.batch_size, gen_batch_size=ev.gen_batch_size,
                            n_boot=ev.n_boot, seed=cfg.seed,
                            repetition_penalty=ev.repetition_penalty)
    tune_prompts = _subset([p.text for p in load_embedded_prompts(["tuning"])],
                           cfg.tuning.n_prompts, cfg.seed)
    tune_sents = _subset(split_sentences(cfg.cache_dir, cfg.target, "tuning"),
                         cfg.tuning.n_sentences, cfg.seed)
    eval_prompt_rows = _subset(load_embedded_prompts(["evaluation"]), ev.n_prompts, cfg.seed)
    eval_prompts = [p.text for p in eval_prompt_rows]
    eval_sents = _subset(split_sentences(cfg.cache_dir, cfg.target, "evaluation"),
                         ev.n_sentences, cfg.seed)
    fr = cfg.frontier
    fr_prompts = _subset(eval_prompts, fr.n_prompts, cfg.seed + 1)
    fr_sents = _subset(eval_sents, fr.n_sentences, cfg.seed + 1)
    log.info("steer %s→%s: window %s; tuning %d prompts / %d sentences, evaluation %d / %d",
             cfg.english, cfg.target, loc.window, len(tune_prompts), len(tune_sents),
             len(eval_prompts), len(eval_sents))
    ids = identifiers_for(cfg.target, cfg.english)
    # tokenised once; the unsteered log-probs are computed once per split and reused by
    # every method and tuning point
    tune_sents, eval_sents, fr_sents = (HeldOutText(model, tokenizer, s, ev.batch_size)
                                        for s in (tune_sents, eval_sents, fr_sents))
    nll_offset = 0.0
    if ev.nll_guard_language_offset:
        english_sents = _subset(split_sentences(cfg.cache_dir, cfg.english, "evaluation"),
                                ev.n_sentences, cfg.seed)
        nll_offset = language_nll_offset(model, tokenizer, eval_sents, english_sents,
                                         ev.batch_size)
        log.info("NLL guard: language offset %+.3f nats/token (%s − %s, unsteered)",
                 nll_offset, cfg.target, cfg.english)

    caa_means = None
    if {"caa_layer", "caa_window"} & set(cfg.methods):
        layers = sorted(set(loc.window) | set(caa_candidate_layers(loc, cfg)))
        caa_means = residual_mean_differences(cfg.cache_dir, layers, cfg.target, cfg.english)

    base_key = {"model": info.to_dict(), "localise": loc.summary.get("provenance", {})
                .get("created"), "window": loc.window,
                "settings": _without_defaults(dataclasses.asdict(settings)),
                "tuning": dataclasses.asdict(cfg.tuning), "eval": _method_eval_key(ev),
                "frontier": dataclasses.asdict(fr), "position": cfg.position,
                "decode_steps": cfg.decode_steps, "sustain": cfg.sustain, "seed": cfg.seed,
                "primary": cfg.primary}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    # the reference: the unsteered model
    ref_metrics, ref_gens = evaluate_method(model, tokenizer, None, target=cfg.target,
                                            english=cfg.english, prompts=eval_prompts,
                                            sentences=eval_sents, token_sets=sets,
                                            settings=settings, identifiers=ids)
    from steering.evaluate.harness import continuation_nll, nll_guard_skip

    ref_nll = continuation_nll(model, tokenizer, eval_prompts, ref_gens.new_ids,
                               nll_guard_skip(cfg.decode_steps), settings.template,
                               settings.batch_size)
    methods: dict[str, dict] = {"none": {"metrics": ref_metrics, "strengths": {}, "tuning": []}}
    log.info("none: DEFAULT %.2f, ΔM %+.3f", ref_metrics["default"]["mean"],
             ref_metrics["delta_m"]["mean"])
    if ev.native_reference:
        native = native_reference(model, tokenizer, cfg, eval_prompt_rows, eval_sents, sets,
                                  settings, ids)
        if native is not None:
            methods["native"] = native

    window, window_scan = choose_steer_window(model, tokenizer, loc, cfg, tune_prompts,
                                              tune_sents, sets, settings, caa_means, work,
                                              base_key)
    base_key["steer_window"] = window
    for method in tqdm(cfg.methods, desc=f"methods ({cfg.target})", disable=not cfg.progress):
        key = _key({**base_key, "method": method})
        done = work / f"{method}.json"
        art_dir = out / "artifacts" / method
        if cfg.resume and done.is_file() and (art_dir / "steer.json").is_file():
            stored = json.loads(done.read_text())
            if stored.get("key") == key:
                methods[method] = stored["result"]
                log.info("%s: reused %s", method, done)
                continue
        t0 = time.perf_counter()
        art = build_method(method, loc, cache_dir=cfg.cache_dir, seed=cfg.seed,
                           position=cfg.position, decode_steps=cfg.decode_steps,
                           sustain=cfg.sustain,
                           caa_means=caa_means, window=window,
                           ablation_of=_ablation_of(cfg))
        same = _same_as_primary(method, cfg, methods)
        if same is not None:
            # proven identical: the primary tuned β = 0, so this λ-only ablation walks the
            # same λ line, picks the same λ and evaluates the same edit
            art = art.with_strengths(lam=same["strengths"]["lam"], beta=0.0, gamma=1.0)
            points = [p for p in same["tuning"] if p["beta"] == 0.0]
            art.provenance.update({"tuning": {"kl_budget": cfg.tuning.kl_budget,
                                              "met_budget": same["tuning_met_budget"],
                                              "points": points, "same_as": cfg.primary},
                                   "model": info.to_dict()})
            art.save(art_dir)
            result = {**same, "tuning": points, "artifact": str(art_dir),
                      "describe": art.describe(), "same_as": cfg.primary,
                      "seconds": time.perf_counter() - t0}
            if method not in fr.methods:
                result.pop("frontier", None)
            elif "frontier" not in result:
                result["frontier"] = frontier_points(model, tokenizer, art, fr.gammas,
                                                     fr_prompts, fr_sents, sets, settings, ids)
            methods[method] = result
            done.write_text(json.dumps({"key": key, "result": result}, default=str))
            log.info("%s: identical to %s (its tuned β = 0); result shared", method, cfg.primary)
            continue
        layer_scan = None
        if method == "caa_layer" and cfg.tuning.caa_layer_stride is not None:
            art, points, ok, layer_scan = tune_caa_layer(model, tokenizer, loc, cfg,
                                                         tune_prompts, tune_sents, sets,
                                                         settings, caa_means, ids)
        else:
            art, points, ok = tune_strengths(model, tokenizer, art, TUNED[method],
                                             prompts=tune_prompts, sentences=tune_sents,
                                             token_sets=sets, kl_budget=cfg.tuning.kl_budget,
                                             lams=cfg.tuning.lams, betas=cfg.tuning.betas,
                                             settings=settings,
                                             stop_over_budget=cfg.tuning.stop_over_budget,
                                             objective=cfg.tuning.objective, identifiers=ids)
        art.provenance.update({"tuning": {"kl_budget": cfg.tuning.kl_budget,
                                          "met_budget": ok, "points": [p.to_dict()
                                                                       for p in points],
                                          **({"layer_scan": layer_scan} if layer_scan else {})},
                               "model": info.to_dict()})
        art.save(art_dir)
        metrics, _ = evaluate_method(model, tokenizer, art, target=cfg.target,
                                     english=cfg.english, prompts=eval_prompts,
                                     sentences=eval_sents, token_sets=sets, settings=settings,
                                     reference=ref_gens, reference_nll=ref_nll, identifiers=ids,
                                     nll_offset=nll_offset)
        strengths = {} if TUNED[method] == "none" else {"lam": art.lam, "beta": art.beta}
        result = {"metrics": metrics, "strengths": strengths,
                  "tuning": [p.to_dict() for p in points], "tuning_met_budget": ok,
                  "artifact": str(art_dir), "describe": art.describe(),
                  "seconds": time.perf_counter() - t0}
        if layer_scan is not None:
            result["layer_scan"] = layer_scan
        if method in fr.methods:
            result["frontier"] = frontier_points(model, tokenizer, art, fr.gammas, fr_prompts,
                                                 fr_sents, sets, settings, ids)
        methods[method] = result
        done.write_text(json.dumps({"key": key, "result": result}, default=str))
        log.info("%s (λ=%g, β=%g%s): DEFAULT %.2f, ΔM %+.3f, KL_gen %.3f, ΔNLL_gen %+.3f, "
                 "%.0f s", method, art.lam, art.beta, "" if ok else ", KL budget NOT met",
                 metrics["default"]["mean"], metrics["delta_m"]["mean"],
                 metrics["kl_gen"]["mean"], metrics["nll_change_gen"]["mean"],
                 result["seconds"])

    frontier = {m: r["frontier"] for m, r in methods.items() if r.get("frontier")}
    if "prompting" in methods:
        pm = methods["prompting"]["metrics"]
        frontier["prompting"] = [{"gamma": 1.0, "default": pm["default"]["mean"],
                                  "kl": pm["kl_gen"]["mean"]}]
    frontier["none"] = [{"gamma": 0.0, "default": ref_metrics["default"]["mean"], "kl": 0.0}]
    bars = _check_bars(cfg.target, methods[cfg.primary]["metrics"], cfg.primary) \
        if cfg.primary in methods else []
    findings = frontier_findings(methods, cfg.primary)
    report = {
        "target": cfg.target, "english": cfg.english, "model": info.name,
        "window": window, "localised_window": loc.window, "window_scan": window_scan,
        "primary": cfg.primary, "kl_budget": cfg.tuning.kl_budget,
        "nll_guard_offset": nll_offset,
        "n_prompts": len(eval_prompts), "n_sentences": len(eval_sents),
        "methods": methods, "frontier": frontier, "bars": bars, "findings": findings,
        "layer_gains": {l: r.get("causal_gain") for l, r in loc.summary["layers"].items()},
        "settings": {"position": cfg.position, "decode_steps": cfg.decode_steps,
                     "sustain": cfg.sustain,
                     "tuning": dataclasses.asdict(cfg.tuning), "evaluation": dataclasses.asdict(ev),
                     "guards": dataclasses.asdict(settings.guards), "seed": cfg.seed,
                     "localise": str(Path(cfg.localise_dir).resolve())},
        "runtime_seconds": time.perf_counter() - started,
    }
    files = write_report(report, out / "report",
                         {**dataclasses.asdict(cfg.wandb), "dir": str(out),
                          "name": f"steer-{cfg.target}"})
    for b in bars:
        log.info("bar %s: %s", "MET" if b["met"] else "NOT MET", b["text"])
    log.info("done in %.0f s → %s", report["runtime_seconds"], files["md"])
    return {**report, "files": files}


def _method_eval_key(ev) -> dict:
    """The evaluation settings a method's stored result depends on (the native reference's
    keys do not: changing them must not re-run every method)."""
    key = _without_defaults(dataclasses.asdict(ev))
    for name in ("native_reference", "native_template"):
        key.pop(name, None)
    return key


# Settings added after results were first stored, with the value that reproduces the old
# behaviour: left out of a result's key at that value, so stored results stay valid.
_KEY_DEFAULTS = {"repetition_penalty": 1.0}


def _without_defaults(key: dict) -> dict:
    return {k: v for k, v in key.items()
            if not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}


def native_reference(model, tokenizer, cfg: SteerAppConfig, prompts, sentences, sets,
                     settings: EvalSettings, identifiers) -> dict | None:
    """The "native" row (steering.evaluate.native): the unsteered model asked the evaluation prompts
    in the target language, scored like every method; None (with a warning) when the target
    has no template or no translated prompts."""
    template = native_template(cfg.target, cfg.evaluation.native_template)
    if template is None:
        log.warning("native reference skipped: no built-in %s template; set "
                    "evaluation.native_template", cfg.target)
        return None
    texts, kept = native_prompts(prompts, cfg.target)
    if not texts:
        log.warning("native reference skipped: no %s translation of any evaluation prompt",
                    cfg.target)
        return None
    t0 = time.perf_counter()
    metrics, _ = evaluate_method(model, tokenizer, None, target=cfg.target, english=cfg.english,
                                 prompts=texts, sentences=sentences, token_sets=sets,
                                 settings=dataclasses.replace(settings, template=template),
                                 identifiers=identifiers)
    log.info("native (the unsteered model asked in %s, %d prompts): DEFAULT %.2f, looping %.2f",
             cfg.target, len(texts), metrics["default"]["mean"], metrics["looping"]["mean"])
    return {"metrics": metrics, "strengths": {}, "tuning": [], "template": template,
            "prompt_ids": kept, "seconds": time.perf_counter() - t0,
            "reference": f"the unsteered model asked in {cfg.target} (translated prompt and "
                         "template), judged like every method"}


def _same_as_primary(method: str, cfg: SteerAppConfig, methods: dict) -> dict | None:
    """The primary's result when ``method`` is its positive-only ablation and the primary
    itself tuned β = 0: then both are tuned on the same λ line (the same artifact at each
    point), pick the same λ and evaluate the same edit, so the result is the primary's."""
    primary = methods.get(cfg.primary)
    if (method != "foxp2_pos" or primary is None or _ablation_of(cfg) != cfg.primary
            or TUNED[cfg.primary] != "both"):
        return None
    if primary["strengths"].get("beta") != 0.0:
        return None
    return primary


def caa_candidate_layers(loc: Localisation, cfg: SteerAppConfig) -> list[int]:
    """caa_layer's candidate layers: every ``tuning.caa_layer_stride``-th analysed layer and
    the localisation's best causal layer (that one alone when the stride is null)."""
    best = loc.best_causal_layer()
    stride = cfg.tuning.caa_layer_stride
    if stride is None:
        return [best]
    return sorted(set(sorted(loc.layers)[::stride]) | {best})


def tune_caa_layer(model, tokenizer, loc: Localisation, cfg: SteerAppConfig, prompts,
                   sentences, sets, settings: EvalSettings, caa_means, identifiers
                   ) -> tuple[SteeringArtifact, list[TuningPoint], bool, list[dict]]:
    """caa_layer tuned (λ grid, same budget and objective as every method) at each candidate
    layer; the layer whose tuned point ranks best wins, by the rule within one layer
    (:func:`steering.evaluate.harness.best_point`). Returns its artifact, its points, whether it met
    the budget, and the scan (one row per layer)."""
    tuned_layers = []
    for layer in caa_candidate_layers(loc, cfg):
        art = build_method("caa_layer", loc, cache_dir=cfg.cache_dir, seed=cfg.seed,
                           position=cfg.position, decode_steps=cfg.decode_steps,
                           sustain=cfg.sustain, caa_means=caa_means, caa_layer=layer)
        art, points, ok = tune_strengths(model, tokenizer, art, TUNED["caa_layer"],
                                         prompts=prompts, sentences=sentences,
                                         token_sets=sets, kl_budget=cfg.tuning.kl_budget,
                                         lams=cfg.tuning.lams, betas=cfg.tuning.betas,
                                         settings=settings,
                                         stop_over_budget=cfg.tuning.stop_over_budget,
                                         objective=cfg.tuning.objective,
                                         identifiers=identifiers)
        chosen = next(p for p in points if p.lam == art.lam and p.beta == art.beta)
        tuned_layers.append((layer, art, points, ok, chosen))
        log.info("caa_layer at layer %d: best λ=%g ΔM %+.4f KL %.4f%s", layer, art.lam,
                 chosen.delta_m, chosen.kl, "" if ok else " (budget not met)")
    # a layer that met no budget has its smallest-KL point, itself over the budget
    best, _ = best_point([row[4] for row in tuned_layers], cfg.tuning.objective)
    layer, art, points, ok, _ = next(row for row in tuned_layers if row[4] is best)
    scan = [{"layer": l, **c.to_dict(), "within_budget": o, "chosen": l == layer}
            for l, _, _, o, c in tuned_layers]
    log.info("caa_layer: layer %d (localisation's best causal layer: %d)", layer,
             loc.best_causal_layer())
    return art, points, ok, scan


def candidate_windows(loc: Localisation, width: int | None, stride: int) -> list[list[int]]:
    """The localised window, then contiguous windows of ``width`` analysed layers."""
    out = [list(loc.window)]
    if width is None:
        return out
    layers = sorted(loc.layers)
    for start in range(layers[0], layers[-1] - width + 2, stride):
        w = list(range(start, start + width))
        if set(w) <= set(layers) and w not in out:
            out.append(w)
    return out


def choose_steer_window(model, tokenizer, loc: Localisation, cfg: SteerAppConfig, prompts,
                        sentences, sets, settings: EvalSettings, caa_means, work: Path,
                        base_key: dict) -> tuple[list[int], list[dict]]:
    """Tune the primary method at every candidate window; the best (max ΔM within the KL
    budget, else the smallest KL) is the steering window. Cached in work/window.json."""
    cands = candidate_windows(loc, cfg.tuning.window_width, cfg.tuning.window_stride)
    if len(cands) == 1 or TUNED[cfg.primary] == "none":
        return cands[0], []
    key = _key({**base_key, "windows": cands, "primary": cfg.primary})
    done = work / "window.json"
    if cfg.resume and done.is_file():
        stored = json.loads(done.read_text())
        if stored.get("key") == key:
            log.info("window: reused %s → %s", done, stored["window"])
            return stored["window"], stored["scan"]
    # the short scan grid (tuning.window_lams at β = 0); a β-only primary keeps its β grid
    short = cfg.tuning.window_lams is not None and TUNED[cfg.primary] != "beta"
    scan_lams = cfg.tuning.window_lams if short else cfg.tuning.lams
    scan_betas = [0.0] if short else cfg.tuning.betas
    scan = []
    for w in cands:
        art = build_method(cfg.primary, loc, cache_dir=cfg.cache_dir, seed=cfg.seed,
                           position=cfg.position, decode_steps=cfg.decode_steps,
                           sustain=cfg.sustain,
                           caa_means=caa_means, window=w,
                           ablation_of=_ablation_of(cfg))
        tuned, points, ok = tune_strengths(model, tokenizer, art, TUNED[cfg.primary],
                                           prompts=prompts, sentences=sentences,
                                           token_sets=sets, kl_budget=cfg.tuning.kl_budget,
                                           lams=scan_lams, betas=scan_betas,
                                           settings=settings,
                                           stop_over_budget=cfg.tuning.stop_over_budget)
        best = next(p for p in points if p.lam == tuned.lam and p.beta == tuned.beta)
        scan.append({"window": w, "lam": tuned.lam, "beta": tuned.beta,
                     "delta_m": best.delta_m, "kl": best.kl, "within_budget": ok,
                     "localised": w == list(loc.window)})
        log.info("window %s: best λ=%g β=%g ΔM %+.4f KL %.4f%s", w, tuned.lam, tuned.beta,
                 best.delta_m, best.kl, "" if ok else " (budget not met)")
    ok = [r for r in scan if r["within_budget"]]
    chosen = max(ok, key=lambda r: r["delta_m"]) if ok else min(scan, key=lambda r: r["kl"])
    done.write_text(json.dumps({"key": key, "window": chosen["window"], "scan": scan}))
    log.info("steering window %s (localised: %s)", chosen["window"], loc.window)
    return chosen["window"], scan


def frontier_points(model, tokenizer, art: SteeringArtifact, gammas, prompts, sentences, sets,
                    settings: EvalSettings, identifiers) -> list[dict]:
    """DEFAULT (head + guards without the NLL guard) and KL_gen at each γ, on a subset."""
    pts = []
    for g in gammas:
        gens = generate(model, tokenizer, prompts, art, sets, art.target, art.english, settings,
                        gamma=g, max_new_tokens=settings.head_tokens)
        default = guarded_default(gens, art.target, identifiers, settings.guards)
        kl = float(np.nanmean(sentence_scores(model, tokenizer, sentences, art, modes=("gen",),
                                              batch_size=settings.batch_size, gamma=g
                                              ).kl["gen"]))
        pts.append({"gamma": g, "default": default, "kl": kl,
                    "delta_m": float(gens.delta_m.mean())})
    return pts


def frontier_findings(methods: dict, primary: str) -> list[str]:
    """Is the primary method on or beyond the KL–DEFAULT frontier of CAA and prompting?"""
    out = []
    p = methods.get(primary)
    if p is None:
        return out
    pd, pk = p["metrics"]["default"]["mean"], p["metrics"]["kl_gen"]["mean"]
    for rival in ("prompting", "caa_layer", "caa_window"):
        r = methods.get(rival)
        if r is None:
            continue
        rd, rk = r["metrics"]["default"]["mean"], r["metrics"]["kl_gen"]["mean"]
        dominated = rd >= pd and rk <= pk and (rd > pd or rk < pk)
        out.append(f"{primary} (DEFAULT {pd:.2f}, KL {pk:.3f}) vs {rival} (DEFAULT {rd:.2f}, "
                   f"KL {rk:.3f}): " + ("DOMINATED by " + rival if dominated
                                        else "on or beyond its frontier"))
    return out
