"""Neural FOXP2 stage III for one target: build → tune → evaluate every method → report.

:func:`run_steer` is what ``foxp2-steer`` (:mod:`steering.apps.steer_app`) runs; settings are
:class:`steering.evaluate.config.SteerAppConfig`. Splits (never mixed): the localisation used the
**discovery** split; (λ, β) are tuned on the **tuning** split (prompts and target sentences);
every number of the report comes from the **evaluation** split. Each method is built and tuned
as its entry in the registry says (:mod:`steering.steer.methods`); :func:`run_steer` is the list of
steps, each a function below: start the run → load the splits → evaluate the unsteered reference
→ the native row → choose the steering window → each method (reused, shared with the primary, or
tuned and evaluated) → assemble and write the report.

Outputs under ``out_dir``::

    artifacts/<method>/{steer.safetensors, steer.json}   tuned, loadable by steer() / foxp2-generate
    report/report.{json,md}, report/plots/*.png         the table with CIs, frontier, γ plots
    work/<method>.json                                   finished methods (reused on re-run)

Interrupted runs lose at most the method in progress: each finished method is written to
``work/`` with a key of its inputs and settings and reused when the key matches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_train.corpora.embedded import load_embedded_prompts, load_prompt_translations
from steering.evaluate.config import SteerAppConfig
from steering.evaluate.harness import (EvalSettings, Generations, HeldOutText, continuation_nll,
                                       evaluate_method, generate, guarded_default,
                                       language_nll_offset, nll_guard_skip, sentence_scores)
from steering.evaluate.judge import identifiers_for
from steering.evaluate.native import native_prompts, native_template
from steering.evaluate.relevance import (RelevanceCheck, RelevanceSettings, calibrate_threshold,
                                         relevance_pmi)
from steering.evaluate.teacher import teacher_answers
from steering.evaluate.report import write_report
from steering.evaluate.tuning import HarnessTuner, choose_steer_window, content_key, tune_method
from steering.language.token_sets import LanguageTokenSets
from steering.localise.config import as_config
from steering.steer.artifact import SteeringArtifact
from steering.steer.build import ResidualMeans
from steering.steer.localisation import Localisation
from steering.steer.methods import (ABLATED_MODES, BuildRequest, Placement, build, method_spec,
                                     strengths_of)

log = logging.getLogger("foxp2-steer")

# The bars on the demo model, for the primary method (gen-position NLL change).
# With a native row in the run, the DEFAULT bar is that row's DEFAULT minus NATIVE_MARGINS and
# the script bar is the native row's script fraction (the absolute numbers apply without one).
BARS = {"es": {"default": 0.95, "nll_change_gen": 0.05},
        "hi": {"default": 0.90, "nll_change_gen": 0.10, "script_fraction": 0.8}}
NATIVE_MARGINS = {"es": 0.05, "hi": 0.15}


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
    return cfg.primary if cfg.primary in ABLATED_MODES else "foxp2"


def _check_bars(target: str, metrics: dict, method: str, native: dict | None = None
                ) -> list[dict]:
    """The bars of ``method``'s metrics, set against the ``native`` row's metrics when given."""
    out = []
    for key, bound in BARS.get(target, {}).items():
        if native is not None and key == "default" and target in NATIVE_MARGINS:
            bound = round(native["default"]["mean"] - NATIVE_MARGINS[target], 4)
        elif native is not None and key == "script_fraction" and key in native:
            bound = round(native[key]["mean"], 4)
        value = metrics[key]["mean"]
        met = value >= bound if key in ("default", "script_fraction") else value <= bound
        rel = "≥" if key in ("default", "script_fraction") else "≤"
        out.append({"method": method, "metric": key, "value": value, "bound": bound, "met": met,
                    "text": f"{method}: {key} = {value:.3f} ({rel} {bound})"})
    return out


@dataclass
class SteerRun:
    """What every step of :func:`run_steer` reads: the settings, the localisation, the model."""

    cfg: SteerAppConfig
    loc: Localisation
    sets: LanguageTokenSets
    model: Any
    tokenizer: Any
    info: Any
    settings: EvalSettings
    identifiers: Any
    out: Path
    work: Path
    started: float


@dataclass
class SteerSplits:
    """The texts of the tuning and evaluation splits (and the frontier's subset)."""

    tune_prompts: list[str]
    tune_sents: HeldOutText
    eval_prompt_rows: list  # the embedded prompt records (the native row needs their ids)
    eval_prompts: list[str]
    eval_sents: HeldOutText
    fr_prompts: list[str]
    fr_sents: HeldOutText
    # The relevance guard (calibrated on the tuning split's native answers), or None.
    relevance: RelevanceCheck | None = None


@dataclass
class Reference:
    """The unsteered model on the evaluation split: every method is compared with it."""

    metrics: dict
    gens: Generations
    nll: Any  # its continuations' NLL (the fluency guard's baseline)
    nll_offset: float  # the NLL guard's language offset (0 when off)


def run_steer(cfg, model_bundle: tuple | None = None) -> dict:
    """Run stage III for ``cfg`` (a :class:`SteerAppConfig` or the app's DictConfig)."""
    run = start_run(as_config(cfg, SteerAppConfig), model_bundle)
    splits = load_splits(run)
    splits.relevance = calibrate_relevance(run)
    reference = evaluate_reference(run, splits)
    base_key = result_key(run)
    methods: dict[str, dict] = {"none": {"metrics": reference.metrics, "strengths": {},
                                         "tuning": []}}
    native = native_row(run, splits)
    if native is not None:
        methods["native"] = native
    request = build_request(run)
    tuner = harness_tuner(run, splits)
    window, window_scan = choose_steer_window(
        run.cfg.primary, request, tuner, window_width=run.cfg.tuning.window_width,
        window_stride=run.cfg.tuning.window_stride, window_lams=run.cfg.tuning.window_lams,
        resume=run.cfg.resume, work=run.work, base_key=base_key,
        window_method=run.cfg.tuning.window_method, methods=run.cfg.methods)
    base_key["steer_window"] = window
    request = dataclasses.replace(request, window=window)
    for method in tqdm(run.cfg.methods, desc=f"methods ({run.cfg.target})",
                       disable=not run.cfg.progress):
        methods[method] = steer_method(run, method, request, tuner, splits, reference, methods,
                                       content_key(method_key(run, base_key, method)))
    report = assemble_report(run, splits, reference, methods, window, window_scan)
    greedy = plain_greedy_table(run, splits, methods, base_key, reference)
    if greedy is not None:
        report["plain_greedy"] = greedy
    return write_steer_report(run, report)


def plain_greedy_table(run: SteerRun, splits: SteerSplits, methods: dict, base_key: dict,
                       headline: Reference) -> dict | None:
    """The final artifacts under plain greedy decoding at their tuned strengths (evaluation
    only, no re-tuning), beside the none and native rows decoded the same way
    (``evaluation.plain_greedy_table``). The relevance threshold stays the one calibrated under
    the headline decoding. Stored in work/plain_greedy.json and reused on re-run."""
    ev = run.cfg.evaluation
    if not ev.plain_greedy_table or (ev.repetition_penalty == 1.0
                                     and ev.no_repeat_ngram_size == 0):
        return None
    steers = {m: r["artifact"] for m, r in methods.items() if r.get("artifact")}
    key = content_key({**base_key, "plain_greedy": steers,
                       "results": {m: r.get("describe") for m, r in methods.items()}})
    done = run.work / "plain_greedy.json"
    if run.cfg.resume and done.is_file():
        stored = json.loads(done.read_text())
        if stored.get("key") == key:
            log.info("plain greedy table: reused %s", done)
            return stored["table"]
    greedy = dataclasses.replace(run, settings=dataclasses.replace(
        run.settings, repetition_penalty=1.0, no_repeat_ngram_size=0))
    log.info("plain greedy table: none, native and %d final artifacts, no re-tuning",
             len(steers))
    reference = evaluate_reference(greedy, splits, headline.nll_offset)
    rows = {"none": reference.metrics}
    native = native_row(greedy, splits)
    if native is not None:
        rows["native"] = native["metrics"]
    for method, folder in steers.items():
        art = SteeringArtifact.load(folder)
        rows[method], _ = evaluate_method(
            run.model, run.tokenizer, art, target=run.cfg.target, english=run.cfg.english,
            prompts=splits.eval_prompts, sentences=splits.eval_sents, token_sets=run.sets,
            settings=greedy.settings, reference=reference.gens, reference_nll=reference.nll,
            identifiers=run.identifiers, nll_offset=reference.nll_offset,
            relevance=splits.relevance)
        log.info("plain greedy: %s DEFAULT %.2f", method, rows[method]["default"]["mean"])
    table = {"decoding": "greedy (repetition_penalty 1, no_repeat_ngram_size 0)",
             "methods": rows}
    done.write_text(json.dumps({"key": key, "table": table}, default=str))
    return table


def method_key(run: SteerRun, base_key: dict, method: str) -> dict:
    """What a method's stored result depends on: the run's inputs and settings, plus the app
    config section its registry entry names (e.g. ``learn`` for the learned steers)."""
    spec = method_spec(method)
    section = spec.config_section
    extra = {section: dataclasses.asdict(getattr(run.cfg, section))} if section else {}
    if spec.reads_lape:
        extra["lape_sets"] = run.loc.content_digest(lape=True)
    return {**base_key, "method": method, **extra}


def start_run(cfg: SteerAppConfig, model_bundle: tuple | None) -> SteerRun:
    """Threads and seed set; the localisation, its token sets and the model loaded."""
    from sae_train.models.loading import load_model

    started = time.perf_counter()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
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
                            repetition_penalty=ev.repetition_penalty,
                            no_repeat_ngram_size=ev.no_repeat_ngram_size)
    out = Path(cfg.out_dir)
    return SteerRun(cfg, loc, sets, model, tokenizer, info, settings,
                    identifiers_for(cfg.target, cfg.english), out, out / "work", started)


def load_splits(run: SteerRun) -> SteerSplits:
    """Seeded subsets of the tuning and evaluation splits, held-out text tokenised once (its
    unsteered log-probs are computed once per split and reused by every method and point)."""
    cfg, ev, fr = run.cfg, run.cfg.evaluation, run.cfg.frontier
    tune_prompts = _subset([p.text for p in load_embedded_prompts(["tuning"])],
                           cfg.tuning.n_prompts, cfg.seed)
    tune_sents = _subset(split_sentences(cfg.cache_dir, cfg.target, "tuning"),
                         cfg.tuning.n_sentences, cfg.seed)
    eval_prompt_rows = _subset(load_embedded_prompts(["evaluation"]), ev.n_prompts, cfg.seed)
    eval_prompts = [p.text for p in eval_prompt_rows]
    eval_sents = _subset(split_sentences(cfg.cache_dir, cfg.target, "evaluation"),
                         ev.n_sentences, cfg.seed)
    fr_prompts = _subset(eval_prompts, fr.n_prompts, cfg.seed + 1)
    fr_sents = _subset(eval_sents, fr.n_sentences, cfg.seed + 1)
    log.info("steer %s→%s: window %s; tuning %d prompts / %d sentences, evaluation %d / %d",
             cfg.english, cfg.target, run.loc.window, len(tune_prompts), len(tune_sents),
             len(eval_prompts), len(eval_sents))
    held_out = [HeldOutText(run.model, run.tokenizer, s, ev.batch_size)
                for s in (tune_sents, eval_sents, fr_sents)]
    return SteerSplits(tune_prompts, held_out[0], eval_prompt_rows, eval_prompts, held_out[1],
                       fr_prompts, held_out[2])


def nll_guard_offset(run: SteerRun, splits: SteerSplits) -> float:
    """The NLL guard's language offset (SteerEvalConfig.nll_guard_language_offset), else 0."""
    cfg, ev = run.cfg, run.cfg.evaluation
    if not ev.nll_guard_language_offset:
        return 0.0
    english_sents = _subset(split_sentences(cfg.cache_dir, cfg.english, "evaluation"),
                            ev.n_sentences, cfg.seed)
    offset = language_nll_offset(run.model, run.tokenizer, splits.eval_sents, english_sents,
                                 ev.batch_size)
    log.info("NLL guard: language offset %+.3f nats/token (%s − %s, unsteered)",
             offset, cfg.target, cfg.english)
    return offset


def evaluate_reference(run: SteerRun, splits: SteerSplits, nll_offset: float | None = None
                       ) -> Reference:
    """The unsteered model on the evaluation split, and its continuations' NLL (the NLL guard's
    language offset is measured unless given: it does not depend on the decoding)."""
    cfg = run.cfg
    if nll_offset is None:
        nll_offset = nll_guard_offset(run, splits)
    metrics, gens = evaluate_method(run.model, run.tokenizer, None, target=cfg.target,
                                    english=cfg.english, prompts=splits.eval_prompts,
                                    sentences=splits.eval_sents, token_sets=run.sets,
                                    settings=run.settings, identifiers=run.identifiers,
                                    relevance=splits.relevance)
    nll = continuation_nll(run.model, run.tokenizer, splits.eval_prompts, gens.new_ids,
                           nll_guard_skip(cfg.decode_steps), run.settings.template,
                           run.settings.batch_size)
    log.info("none: DEFAULT %.2f, ΔM %+.3f", metrics["default"]["mean"],
             metrics["delta_m"]["mean"])
    return Reference(metrics, gens, nll, nll_offset)


def result_key(run: SteerRun) -> dict:
    """The inputs and settings every stored result depends on (work/ is created)."""
    cfg = run.cfg
    run.work.mkdir(parents=True, exist_ok=True)
    return {"model": run.info.to_dict(), "localise": run.loc.content_digest(),
            "window": run.loc.window,
            "settings": _without_defaults(dataclasses.asdict(run.settings)),
            "tuning": dataclasses.asdict(cfg.tuning), "eval": _method_eval_key(cfg.evaluation),
            "position": cfg.position,
            "decode_steps": cfg.decode_steps, "sustain": cfg.sustain, "seed": cfg.seed,
            "primary": cfg.primary}


def native_row(run: SteerRun, splits: SteerSplits) -> dict | None:
    """The native reference row, when the app asks for it and the target has one."""
    if not run.cfg.evaluation.native_reference:
        return None
    return native_reference(run.model, run.tokenizer, run.cfg, splits.eval_prompt_rows,
                            splits.eval_sents, run.sets, run.settings, run.identifiers,
                            splits.relevance)


def build_request(run: SteerRun) -> BuildRequest:
    """What every method is built from (at the localised window until the scan chooses)."""
    cfg = run.cfg
    return BuildRequest(localisation=run.loc, window=list(run.loc.window),
                        placement=Placement(cfg.position, cfg.decode_steps, cfg.sustain),
                        seed=cfg.seed, ablation_of=_ablation_of(cfg),
                        residual_means=ResidualMeans(cfg.cache_dir, cfg.target, cfg.english),
                        model=run.model, tokenizer=run.tokenizer, config=cfg,
                        teacher=teacher_provider(run))


def teacher_provider(run: SteerRun):
    """The learned methods' teacher answers (steering.evaluate.teacher), computed on first use
    and cached in work/teacher.json."""
    found: dict = {}

    def provide() -> list:
        if "examples" not in found:
            cfg = run.cfg
            template = native_template(cfg.target, cfg.evaluation.native_template)
            if template is None:
                raise SteerError(f"no native template for {cfg.target!r}: set "
                                 "evaluation.native_template to learn a steer")
            examples, summary = teacher_answers(
                run.model, run.tokenizer, load_embedded_prompts(cfg.learn.teacher_splits),
                target=cfg.target, english=cfg.english, native_template=template,
                token_sets=run.sets, settings=run.settings, identifiers=run.identifiers,
                cache_file=run.work / "teacher.json",
                model_key=json.dumps(run.info.to_dict(), sort_keys=True, default=str),
                judge=cfg.learn.judge_teacher)
            found.update(examples=examples, summary=summary)
        return found["examples"]
    return provide


def calibrate_relevance(run: SteerRun) -> RelevanceCheck | None:
    """τ of the relevance guard from the native answers to the tuning prompts (their PMI's
    ``evaluation.relevance_quantile``); None when the guard is off or the target has no
    native template or translations. The sample is ``evaluation.relevance_prompts`` tuning
    prompts (all by default), not the tuning objective's ``tuning.n_prompts``: a tail quantile
    needs more answers than a DEFAULT rate does."""
    cfg, ev = run.cfg, run.cfg.evaluation
    template = native_template(cfg.target, ev.native_template)
    rows = _subset(load_embedded_prompts(["tuning"]), ev.relevance_prompts, cfg.seed)
    texts, _ = native_prompts(rows, cfg.target)
    if not ev.relevance or template is None or len(texts) < 2:
        return None
    native = dataclasses.replace(run.settings, template=template)
    gens = generate(run.model, run.tokenizer, texts, None, run.sets, cfg.target, cfg.english,
                    native)
    settings = RelevanceSettings(n_others=ev.relevance_others,
                                 max_tokens=ev.max_new_tokens, quantile=ev.relevance_quantile)
    pmi = relevance_pmi(run.model, run.tokenizer, texts, gens.new_ids, template, settings,
                        ev.batch_size)
    tau = calibrate_threshold(pmi, ev.relevance_quantile)
    answered = int(np.isfinite(pmi).sum())  # an empty answer has no PMI
    table = load_prompt_translations(cfg.target)
    # each English prompt's question in the target language, for the evaluation split and
    # for the tuning split (the "default" tuning objective applies the guard there)
    questions = {p.text: table[p.id] for p in load_embedded_prompts(["tuning", "evaluation"])
                 if p.id in table}
    log.info("relevance guard: τ = %.3f nats/token (the %g quantile of %d native tuning "
             "answers' PMI, median %.3f)", tau, ev.relevance_quantile, answered,
             float(np.nanmedian(pmi)))
    return RelevanceCheck(tau, template, settings, questions,
                          calibration_answers=answered)


def tuning_nll_budget(cfg) -> float | None:
    """``tuning.nll_budget`` for the run's target: "bar" is the target's ΔNLL bar (None, with a
    warning, for a target without bars)."""
    budget = cfg.tuning.nll_budget
    if budget is None:
        return None
    if str(budget) == "bar":
        bar = BARS.get(cfg.target, {}).get("nll_change_gen")
        if bar is None:
            log.warning("tuning.nll_budget=bar: %s has no ΔNLL bar; no fluency preference",
                        cfg.target)
        return bar
    return float(budget)


def harness_tuner(run: SteerRun, splits: SteerSplits) -> HarnessTuner:
    return HarnessTuner(run.model, run.tokenizer, splits.tune_prompts, splits.tune_sents,
                        run.sets, run.settings, run.identifiers, run.cfg.tuning,
                        relevance=splits.relevance, nll_budget=tuning_nll_budget(run.cfg))


def steer_method(run: SteerRun, method: str, request: BuildRequest, tuner: HarnessTuner,
                 splits: SteerSplits, reference: Reference, methods: dict, key: str) -> dict:
    """One method's result: reused from work/, shared with the primary, or tuned and evaluated
    (and stored in work/ under ``key``)."""
    done, art_dir = run.work / f"{method}.json", run.out / "artifacts" / method
    result = stored_result(run, method, done, art_dir, key)
    if result is None:
        t0 = time.perf_counter()
        same = _same_as_primary(method, run.cfg, methods)
        if same is not None:
            result = share_primary_result(run, method, build(method, request), same, art_dir,
                                          t0)
        else:
            result = tune_and_evaluate(run, method, request, tuner, splits, reference,
                                       art_dir, t0)
        done.write_text(json.dumps({"key": key, "result": result}, default=str))
    result.pop("frontier", None)
    if method in run.cfg.frontier.methods:
        result["frontier"] = stored_frontier(run, method, art_dir, splits, key)
    return result


def stored_frontier(run: SteerRun, method: str, art_dir: Path, splits: SteerSplits,
                    key: str) -> list[dict]:
    """The method's γ sweep (frontier subset), kept in work/<method>.frontier.json beside its
    result, so that a run with another ``frontier.methods`` reuses the methods themselves."""
    done = run.work / f"{method}.frontier.json"
    fkey = content_key({"method": key, "frontier": dataclasses.asdict(run.cfg.frontier)
                        | {"methods": None}})
    if run.cfg.resume and done.is_file():
        stored = json.loads(done.read_text())
        if stored.get("key") == fkey:
            return stored["frontier"]
    points = method_frontier(run, SteeringArtifact.load(art_dir), splits)
    done.write_text(json.dumps({"key": fkey, "frontier": points}))
    return points


def stored_result(run: SteerRun, method: str, done: Path, art_dir: Path, key: str
                  ) -> dict | None:
    """A finished result of ``method`` in work/ with the same key (``resume``), else None."""
    if run.cfg.resume and done.is_file() and (art_dir / "steer.json").is_file():
        stored = json.loads(done.read_text())
        if stored.get("key") == key:
            log.info("%s: reused %s", method, done)
            return stored["result"]
    return None


def share_primary_result(run: SteerRun, method: str, art: SteeringArtifact, same: dict,
                         art_dir: Path, t0: float) -> dict:
    """Proven identical: the primary tuned β = 0, so this λ-only ablation walks the same λ
    line, picks the same λ and evaluates the same edit; its artifact is saved, the result
    shared."""
    cfg = run.cfg
    art = art.with_strengths(lam=same["strengths"]["lam"], beta=0.0, gamma=1.0)
    points = [p for p in same["tuning"] if p["beta"] == 0.0]
    art.provenance.update({"tuning": {"kl_budget": cfg.tuning.kl_budget,
                                      "met_budget": same["tuning_met_budget"],
                                      "points": points, "same_as": cfg.primary},
                           "model": run.info.to_dict()})
    art.save(art_dir, model=run.model, tokenizer=run.tokenizer)
    result = {**same, "tuning": points, "artifact": str(art_dir), "describe": art.describe(),
              "same_as": cfg.primary, "seconds": time.perf_counter() - t0}
    result.pop("frontier", None)
    log.info("%s: identical to %s (its tuned β = 0); result shared", method, cfg.primary)
    return result


def tune_and_evaluate(run: SteerRun, method: str, request: BuildRequest, tuner: HarnessTuner,
                      splits: SteerSplits, reference: Reference, art_dir: Path,
                      t0: float) -> dict:
    """``method`` tuned on the tuning split (its registry entry), saved, and scored on the
    evaluation split against the unsteered reference."""
    cfg = run.cfg
    tuned = tune_method(method, request, tuner)
    art, points, ok = tuned.artifact, tuned.points, tuned.met_budget
    art.provenance.update({"tuning": {"kl_budget": cfg.tuning.kl_budget, "met_budget": ok,
                                      "points": [p.to_dict() for p in points],
                                      **tuned.record},
                           "model": run.info.to_dict()})
    art.save(art_dir, model=run.model, tokenizer=run.tokenizer)
    metrics, _ = evaluate_method(run.model, run.tokenizer, art, target=cfg.target,
                                 english=cfg.english, prompts=splits.eval_prompts,
                                 sentences=splits.eval_sents, token_sets=run.sets,
                                 settings=run.settings, reference=reference.gens,
                                 reference_nll=reference.nll, identifiers=run.identifiers,
                                 nll_offset=reference.nll_offset, relevance=splits.relevance)
    strengths = {} if strengths_of(method) == "none" else {"lam": art.lam, "beta": art.beta}
    result = {"metrics": metrics, "strengths": strengths,
              "tuning": [p.to_dict() for p in points], "tuning_met_budget": ok,
              "artifact": str(art_dir), "describe": art.describe(),
              "seconds": time.perf_counter() - t0, **tuned.record}
    log.info("%s (λ=%g, β=%g%s): DEFAULT %.2f, ΔM %+.3f, KL_gen %.3f, ΔNLL_gen %+.3f, "
             "%.0f s", method, art.lam, art.beta, "" if ok else ", KL budget NOT met",
             metrics["default"]["mean"], metrics["delta_m"]["mean"],
             metrics["kl_gen"]["mean"], metrics["nll_change_gen"]["mean"], result["seconds"])
    return result


def method_frontier(run: SteerRun, art: SteeringArtifact, splits: SteerSplits) -> list[dict]:
    return frontier_points(run.model, run.tokenizer, art, run.cfg.frontier.gammas,
                           splits.fr_prompts, splits.fr_sents, run.sets, run.settings,
                           run.identifiers)


def frontier_table(methods: dict, reference: Reference) -> dict:
    """Per method its (γ, DEFAULT, KL) points; prompting and none as single points."""
    frontier = {m: r["frontier"] for m, r in methods.items() if r.get("frontier")}
    if "prompting" in methods:
        pm = methods["prompting"]["metrics"]
        frontier["prompting"] = [{"gamma": 1.0, "default": pm["default"]["mean"],
                                  "kl": pm["kl_gen"]["mean"]}]
    frontier["none"] = [{"gamma": 0.0, "default": reference.metrics["default"]["mean"],
                         "kl": 0.0}]
    return frontier


def assemble_report(run: SteerRun, splits: SteerSplits, reference: Reference, methods: dict,
                    window: list[int], window_scan: list[dict]) -> dict:
    """report.json's content (steering.evaluate.report documents it)."""
    cfg, loc = run.cfg, run.loc
    native = methods.get("native", {}).get("metrics")
    bars = _check_bars(cfg.target, methods[cfg.primary]["metrics"], cfg.primary, native) \
        if cfg.primary in methods else []
    return {
        "target": cfg.target, "english": cfg.english, "model": run.info.name,
        "window": window, "localised_window": loc.window, "window_scan": window_scan,
        "primary": cfg.primary, "kl_budget": cfg.tuning.kl_budget,
        "nll_guard_offset": reference.nll_offset,
        "n_prompts": len(splits.eval_prompts), "n_sentences": len(splits.eval_sents),
        "methods": methods, "frontier": frontier_table(methods, reference), "bars": bars,
        "findings": frontier_findings(methods, cfg.primary),
        "layer_gains": {l: r.get("causal_gain") for l, r in loc.summary["layers"].items()},
        "settings": {"position": cfg.position, "decode_steps": cfg.decode_steps,
                     "sustain": cfg.sustain, "tuning": dataclasses.asdict(cfg.tuning),
                     "evaluation": dataclasses.asdict(cfg.evaluation),
                     "guards": dataclasses.asdict(run.settings.guards), "seed": cfg.seed,
                     "localise": str(Path(cfg.localise_dir).resolve())},
        "runtime_seconds": time.perf_counter() - run.started,
    }


def write_steer_report(run: SteerRun, report: dict) -> dict:
    """report/ written (and logged to wandb); the report with its file paths."""
    files = write_report(report, run.out / "report",
                         {**dataclasses.asdict(run.cfg.wandb), "dir": str(run.out),
                          "name": f"steer-{run.cfg.target}"})
    for b in report["bars"]:
        log.info("bar %s: %s", "MET" if b["met"] else "NOT MET", b["text"])
    log.info("done in %.0f s → %s", report["runtime_seconds"], files["md"])
    return {**report, "files": files}


def _method_eval_key(ev) -> dict:
    """The evaluation settings a method's stored result depends on (the native reference's
    keys do not: changing them must not re-run every method)."""
    key = _without_defaults(dataclasses.asdict(ev))
    for name in ("native_reference", "native_template", "plain_greedy_table"):
        key.pop(name, None)
    return key


# Settings added after results were first stored, with the value that reproduces the old
# behaviour: left out of a result's key at that value, so stored results stay valid.
_KEY_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def _without_defaults(key: dict) -> dict:
    return {k: v for k, v in key.items()
            if not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}


def native_reference(model, tokenizer, cfg: SteerAppConfig, prompts, sentences, sets,
                     settings: EvalSettings, identifiers, relevance=None) -> dict | None:
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
                                 identifiers=identifiers, relevance=relevance)
    log.info("native (the unsteered model asked in %s, %d prompts): DEFAULT %.2f, looping %.2f",
             cfg.target, len(texts), metrics["default"]["mean"], metrics["looping"]["mean"])
    return {"metrics": metrics, "strengths": {}, "tuning": [], "template": template,
            "prompt_ids": kept, "seconds": time.perf_counter() - t0,
            "reference": f"the unsteered model asked in {cfg.target} (translated prompt and "
                         "template), judged like every method"}


def _same_as_primary(method: str, cfg: SteerAppConfig, methods: dict) -> dict | None:
    """The primary's result when ``method`` is its positive-only ablation
    (``MethodSpec.same_as_primary_at_beta_zero``) and the primary itself tuned β = 0: then both
    are tuned on the same λ line (the same artifact at each point), pick the same λ and
    evaluate the same edit, so the result is the primary's."""
    primary = methods.get(cfg.primary)
    if (not method_spec(method).same_as_primary_at_beta_zero or primary is None
            or _ablation_of(cfg) != cfg.primary or strengths_of(cfg.primary) != "both"):
        return None
    if primary["strengths"].get("beta") != 0.0:
        return None
    return primary


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
