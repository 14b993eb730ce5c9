"""`foxp2-demo`: the whole pipeline in one command (Hydra app).

    foxp2-demo                                  # Gemma-3-270m, embedded corpus, es + hi, CPU
    foxp2-demo compare=full                     # every baseline and ablation (conf/compare/)
    foxp2-demo 'targets=[hi]' force='[steer]'   # redo only Hindi's steer stage
    foxp2-demo --config-name demo_tiny          # seconds-scale run on the tiny model (CI)

Stages, each the real app with the overrides of ``conf/demo.yaml`` plus the ``compare`` choice
(each stage's command line is printed before it starts, so it can be re-run alone)::

    sae-cache      → <root>/demo/<model>/cache                      (subprocess)
    sae-train      → <root>/demo/<model>/saes/layers.{i}.resid/    (subprocess; one run, or
                                                                    train_processes at once)
    foxp2-localise → <root>/demo/<model>/localise-<t>/              (per target, in process)
    foxp2-steer    → <root>/demo/<model>/steer-<t>/{artifacts,report}/   (per target, in process)

The localise and steer stages run in this process through :mod:`steering.api` and share one
loaded model (``in_process=false``: a subprocess each). With ``parallel_targets=true`` (the
demo's setting) each target's localise → steer runs in a child process of its own, all targets
at once after the shared cache and SAEs, the CPU cores split between them; their output is
prefixed ``[<target>]``. A stage whose outputs exist is skipped
(``force=[stage,…]`` redoes it); an interrupted stage resumes (the cache by shard, the steer
stage by method). The end prints the wall time per stage and, per language, the headline FOXP2
method next to the native row, the best baseline and the unsteered model, with the bars and
where the steer, report and plots are; all of it is written to
``<root>/demo/<model>/demo_summary.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from steering.apps import config_dir

STAGES = ("cache", "train", "localise", "steer")
MODULES = {"cache": "sae_train.apps.cache_app", "train": "sae_train.apps.train_app",
           "localise": "steering.apps.localise_app", "steer": "steering.apps.steer_app"}


@dataclass
class CompareConfig:
    """Which comparison the steer (and localise) stages run: a conf/compare/ choice,
    ``compare=fast`` (default: the headline FOXP2 method, the strongest baseline, none and
    native) or ``compare=full`` (every baseline and ablation, the frontier, plain greedy)."""

    name: str = "fast"
    # Hydra overrides appended to the steer stage's (after `steer`).
    steer: list[str] = field(default_factory=list)
    # Hydra overrides appended to the localise stage's (after `localise`).
    localise: list[str] = field(default_factory=list)


@dataclass
class DemoAppConfig:
    # A conf/model/ choice, passed to every stage as model=<name>.
    model: str = "gemma3_270m"
    targets: list[str] = field(default_factory=lambda: ["es", "hi"])
    root: str = "${oc.env:FOXP2_HOME,foxp2_runs}"
    # Extra Hydra overrides per stage (conf/demo.yaml sets the demo's sizes).
    cache: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    localise: list[str] = field(default_factory=list)
    steer: list[str] = field(default_factory=list)
    # The comparison (conf/compare/: fast or full), appended to the stages' overrides.
    compare: CompareConfig = field(default_factory=CompareConfig)
    # Stages to recompute even when their outputs exist.
    force: list[str] = field(default_factory=list)
    # Per-stage wall-clock limit in seconds (null: none) of the stages run as subprocesses.
    stage_timeout: int | None = None
    # Run localise and steer in this process with one shared model (false: each stage a
    # subprocess of its app, as the printed command; slower by a model load per stage).
    in_process: bool = True
    # With several targets, run each target's localise → steer in its own process at the same
    # time, the CPU cores split between them (torch threads per process: cores // targets).
    # On 2 CPU cores two 1-thread processes do 1.3× the work of one 2-thread process
    # (docs/results.md, "Issue 17"); each process holds its own model (memory × targets).
    parallel_targets: bool = False
    # Train the SAEs in this many processes at once, each on its share of the sites with
    # cores // processes torch threads (1: one sae-train run for every site). On 2 CPU cores
    # two 1-thread runs of 9 SAEs each finish before one 2-thread run of 18 (docs/results.md).
    train_processes: int = 1

    def __post_init__(self):
        bad = sorted(set(self.force) - set(STAGES))
        if bad:
            raise ValueError(f"force={self.force}: unknown stages {bad}; use {list(STAGES)}")
        if not self.targets:
            raise ValueError("targets=[] selects nothing; give e.g. targets=[es,hi]")
        if self.train_processes < 1:
            raise ValueError(f"train_processes={self.train_processes}: must be ≥ 1")


ConfigStore.instance().store(name="demo_schema", node=DemoAppConfig)


def _folder(cfg: DemoAppConfig) -> Path:
    return Path(cfg.root) / "demo" / cfg.model


def _done(stage: str, out: Path, n_layers: int | None = None) -> bool:
    if stage == "cache":
        m = out / "manifest.json"
        return m.is_file() and bool(json.loads(m.read_text()).get("complete"))
    if stage == "train":
        saes = sorted(out.glob("layers.*.resid/sae.safetensors"))
        return bool(saes) and (n_layers is None or len(saes) >= n_layers)
    if stage == "localise":
        return (out / "localise" / "summary.json").is_file() \
            and (out / "directions.safetensors").is_file()
    return (out / "report" / "report.json").is_file()


STAGE_ARGS = "demo_stage_args.json"  # the overrides a finished steer stage ran with


def _steer_done_with(out: Path, args: list[str]) -> bool:
    """A steer stage counts as done only for the overrides it ran with: another comparison
    (``compare=full`` after ``compare=fast``) reruns it, resuming every method it finished."""
    record = out / STAGE_ARGS
    return record.is_file() and json.loads(record.read_text()) == list(args)


def _localise_has_lape_if_asked(out: Path, args: list[str]) -> bool:
    """compare=fast localises without LAPE (``tracing.lape=false``); a later compare=full
    needs LAPE's neurons for its ``lape`` baseline, so it reruns the localisation (resuming
    every layer's lift) unless LAPE is there."""
    if "tracing.lape=false" in args:
        return True
    summary = json.loads((out / "localise" / "summary.json").read_text())
    return not summary.get("lape", {}).get("skipped", False)


def _cached_resid_sites(cache: Path) -> list[str]:
    """The cache's ``layers.{i}.resid`` sites in layer order (what the demo trains SAEs on)."""
    names = [s["name"] if isinstance(s, dict) else str(s)
             for s in json.loads((cache / "manifest.json").read_text())["sites"]]
    sites = [n for n in names if n.startswith("layers.") and n.endswith(".resid")]
    return sorted(sites, key=lambda s: int(s.split(".")[1]))


def run_train_split(cfg: DemoAppConfig, stage: "Stage", cache: Path, env: dict) -> None:
    """sae-train in ``cfg.train_processes`` processes at once, each on a contiguous share of
    the sites (``<saes>/parts/<k>/``, its own Hydra folder, checkpoint and log), with
    ``cores // processes`` torch threads; each finished part's SAE folders are then moved to
    ``<saes>/<site>/``, where one run would have written them. A part whose SAEs are all in
    place is not rerun; a failed part stops the demo after the others finish."""
    import threading

    sites = _cached_resid_sites(cache)
    if not sites:
        raise SystemExit(f"[foxp2-demo] the cache {cache} has no layers.*.resid site to train")
    n = min(cfg.train_processes, len(sites))
    shares = [sites[len(sites) * k // n:len(sites) * (k + 1) // n] for k in range(n)]
    threads = max(1, _cores() // n)
    kept = [a for a in stage.args if not a.startswith(("sites=", "out_dir=", "num_threads="))]
    running = []
    for k, share in enumerate(shares):
        if all((stage.out / site / "sae.safetensors").is_file() for site in share):
            continue
        part = stage.out / "parts" / str(k)
        args = [*kept, f"sites=[{','.join(share)}]", f"out_dir={part}",
                f"num_threads={threads}", f"hydra.run.dir={part / 'hydra'}"]
        print(f"[foxp2-demo] train part {k}: sae-train {shlex.join(args)}", flush=True)
        cmd = [sys.executable, "-c", f"from {MODULES['train']} import main; main()", *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[train {k}] "), daemon=True)
        pump.start()
        running.append((k, share, part, proc, pump))
    failed = []
    for k, share, part, proc, pump in running:
        try:
            code = proc.wait(timeout=cfg.stage_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        pump.join()
        if code != 0:
            failed.append(k)
            continue
        for site in share:
            target = stage.out / site
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(part / site), str(target))
    if failed:
        raise SystemExit(f"[foxp2-demo] train part(s) {failed} failed (output above, prefixed "
                         "[train <part>]); re-run the same command to resume")


def _cached_layers(cache: Path) -> int | None:
    if not (cache / "manifest.json").is_file():
        return None
    return len(_cached_resid_sites(cache))


@dataclass
class Stage:
    """One subprocess of the demo: its app, target ("" for cache/train), folder, overrides."""

    stage: str
    target: str
    out: Path
    args: list[str]

    @property
    def label(self) -> str:
        return f"{self.stage}{'-' + self.target if self.target else ''}"


def demo_plan(cfg, base: Path) -> list[Stage]:
    """cache → train → (localise → steer) per target, each with its Hydra overrides."""
    cache, saes = base / "cache", base / "saes"
    common = [f"model={cfg.model}", f"paths.root={Path(cfg.root).resolve()}"]
    plan = [
        Stage("cache", "", cache, [*common, f"cache.dir={cache}", *cfg.cache]),
        Stage("train", "", saes, [f"paths.root={Path(cfg.root).resolve()}", f"cache_dir={cache}",
                                  f"out_dir={saes}", "sites=layers.*.resid", *cfg.train]),
    ]
    for t in cfg.targets:
        loc = base / f"localise-{t}"
        plan.append(Stage("localise", t, loc, [*common, f"target={t}", f"cache_dir={cache}",
                                               f"sae_dir={saes}", f"out_dir={loc}",
                                               *cfg.localise, *cfg.compare.localise]))
        plan.append(Stage("steer", t, base / f"steer-{t}",
                          [*common, f"target={t}", f"cache_dir={cache}", f"localise_dir={loc}",
                           f"out_dir={base / f'steer-{t}'}", *cfg.steer,
                           *cfg.compare.steer]))
    return plan


APP_NAMES = {"cache": "sae-cache", "train": "sae-train", "localise": "foxp2-localise",
             "steer": "foxp2-steer"}


class SharedModel:
    """The model the localise and steer stages share in this process: loaded once, on the
    first stage that runs (a demo whose stages are all done loads nothing)."""

    def __init__(self, model_overrides: list[str]):
        self.overrides, self.bundle = model_overrides, None

    def get(self) -> tuple:
        if self.bundle is None:
            from steering.api import load_model

            self.bundle = load_model(*self.overrides)
        return self.bundle


def run_stage(cfg, stage: Stage, cache: Path, env: dict, shared: SharedModel | None = None
              ) -> dict:
    """Run one stage (skipped when its outputs exist); its timing row. sae-cache and sae-train
    run as subprocesses; localise and steer run in this process through :mod:`steering.api`,
    sharing one loaded model (the printed command redoes a stage alone)."""
    label = stage.label
    done = _done(stage.stage, stage.out, _cached_layers(cache)) and (
        stage.stage != "steer" or _steer_done_with(stage.out, stage.args)) and (
        stage.stage != "localise" or _localise_has_lape_if_asked(stage.out, stage.args))
    if stage.stage not in cfg.force and done:
        print(f"[foxp2-demo] {label}: outputs exist in {stage.out}, skipped", flush=True)
        return {"stage": label, "seconds": 0.0, "skipped": True}
    args = list(stage.args)
    if stage.stage in ("localise", "steer") and stage.stage in cfg.force:
        args.append("resume=false")
    elif stage.stage == "localise" and _done("localise", stage.out):
        args.append("resume=true")  # only LAPE is missing: every layer's lift is reused
    print(f"[foxp2-demo] {label}: {APP_NAMES[stage.stage]} {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    if stage.stage in ("localise", "steer") and shared is not None:
        from steering import api

        run = api.localise if stage.stage == "localise" else api.steer_and_evaluate
        try:
            run(*args, model_bundle=shared.get())
        except Exception as err:  # the stage's own error, then how to resume
            raise SystemExit(f"[foxp2-demo] stage {label} failed ({type(err).__name__}: "
                             f"{err}); re-run the same command to resume") from err
        finally:
            gc.collect()
    elif stage.stage == "train" and cfg.train_processes > 1:
        run_train_split(cfg, stage, cache, env)
    else:
        cmd = [sys.executable, "-c", f"from {MODULES[stage.stage]} import main; main()", *args]
        result = subprocess.run(cmd, env=env, timeout=cfg.stage_timeout)
        if result.returncode != 0:
            raise SystemExit(f"[foxp2-demo] stage {label} failed (exit {result.returncode}); "
                             f"re-run the same command to resume")
    if stage.stage == "steer":
        (stage.out / STAGE_ARGS).write_text(json.dumps(list(stage.args)))
    return {"stage": label, "seconds": time.perf_counter() - t0, "skipped": False}


def _row(name: str, role: str, result: dict) -> dict:
    m = result["metrics"]
    pick = lambda k: m.get(k, {}).get("mean") if isinstance(m.get(k), dict) else None  # noqa: E731
    d = m["default"]
    return {"method": name, "role": role, "default": d["mean"], "low": d.get("low"),
            "high": d.get("high"), "relevance": pick("relevance"), "kl_gen": pick("kl_gen"),
            "nll_change_gen": pick("nll_change_gen")}


def best_baseline(report: dict) -> str | None:
    """The baseline (a method whose registry role is "baseline": not a FOXP2 variant, not a
    control such as the random or dense ablations) with the highest DEFAULT, among those within
    the KL budget on the evaluation split (any, when none is)."""
    from steering.steer.methods import REGISTRY

    steers = {n: r for n, r in report["methods"].items()
              if n in REGISTRY and REGISTRY[n].role == "baseline" and n != report["primary"]}
    within = {n: r for n, r in steers.items()
              if (r["metrics"].get("kl_gen", {}).get("mean") or 0.0) <= report["kl_budget"]}
    pool = within or steers
    return max(pool, key=lambda n: pool[n]["metrics"]["default"]["mean"]) if pool else None


def report_summary(base: Path, target: str) -> dict | None:
    """A target's headline rows from its report.json (None before it exists): the native
    reference, the primary (FOXP2's headline method), the best baseline, none."""
    rep = base / f"steer-{target}" / "report" / "report.json"
    if not rep.is_file():
        return None
    r = json.loads(rep.read_text())
    methods, primary = r["methods"], r["primary"]
    rows = []
    if "native" in methods:
        rows.append(_row("native", f"asked in {target}", methods["native"]))
    rows.append(_row(primary, "FOXP2 (headline)", methods[primary]))
    rival = best_baseline(r)
    if rival is not None:
        rows.append(_row(rival, "best baseline", methods[rival]))
    rows.append(_row("none", "unsteered", methods["none"]))
    p = methods[primary]["metrics"]
    return {"report": str(rep.with_suffix(".md")), "window": r["window"], "primary": primary,
            "default": p["default"]["mean"], "nll_change_gen": p["nll_change_gen"]["mean"],
            "native_default": methods.get("native", {}).get("metrics", {})
            .get("default", {}).get("mean"),
            "rows": rows, "bars": r.get("bars", []),
            "artifact": methods[primary].get("artifact"),
            "plots": str(rep.parent / "plots"), "decoding": r.get("settings", {})
            .get("evaluation", {})}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def print_summary(summary: dict) -> None:
    """The stage times, then per language the table a person reads in ten seconds."""
    from steering.evaluate.report import decoding_text

    print("\n[foxp2-demo] stage           seconds")
    for row in summary["stages"]:
        print(f"[foxp2-demo] {row['stage']:<15} {row['seconds']:8.1f}"
              f"{'  (skipped: outputs exist)' if row['skipped'] else ''}")
    if any(row.get("parallel") for row in summary["stages"]):
        print("[foxp2-demo] (the per-target stages ran in parallel: the total is the wall time)")
    print(f"[foxp2-demo] total           {summary['total_seconds']:8.1f}")
    for t, r in summary["reports"].items():
        print(f"\n[foxp2-demo] en → {t} (evaluation split, {decoding_text(r['decoding'])}; "
              "DEFAULT with its 95% CI)")
        print(f"  {'method':<22}{'role':<18}{'DEFAULT':<20}{'relevant':>9}{'KL gen':>8}"
              f"{'ΔNLL gen':>10}")
        for row in r["rows"]:
            ci = f"{row['default']:.2f} [{_fmt(row['low'], '.2f')}, {_fmt(row['high'], '.2f')}]"
            print(f"  {row['method']:<22}{row['role']:<18}{ci:<20}"
                  f"{_fmt(row['relevance'], '.2f'):>9}{_fmt(row['kl_gen'], '.3f'):>8}"
                  f"{_fmt(row['nll_change_gen'], '+.3f'):>10}")
        for b in r["bars"]:
            print(f"  bar {'MET    ' if b['met'] else 'NOT MET'} {b['text']}")
        print(f"  steer:  {r['artifact']}   (foxp2-generate artifact=<this folder> …)")
        print(f"  report: {r['report']}   plots: {r['plots']}")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pump(stream, prefix: str) -> None:
    for line in stream:
        print(f"{prefix}{line}", end="", flush=True)


def run_targets_in_parallel(cfg: DemoAppConfig, base: Path, env: dict) -> list[dict]:
    """Each target's stages in its own child process (:func:`run_target_stages`), all at once,
    with ``cores // targets`` torch threads each; their output prefixed ``[<target>]``. Every
    child runs to its end; then a failed one stops the demo, naming its target."""
    import threading

    threads = max(1, _cores() // len(cfg.targets))
    print(f"[foxp2-demo] targets {cfg.targets} in parallel, {threads} torch thread(s) each",
          flush=True)
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = {}
    for t in cfg.targets:
        spec = logs / f"parallel-{t}.json"
        spec.write_text(json.dumps({"config": dataclasses.asdict(cfg), "target": t,
                                    "threads": threads, "timings": None}))
        cmd = [sys.executable, "-c", "from steering.apps.demo_app import run_target_stages; "
               f"run_target_stages({str(spec)!r})"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{t}] "), daemon=True)
        pump.start()
        children[t] = (proc, pump, spec)
    failed = []
    for t, (proc, pump, _) in children.items():
        if proc.wait() != 0:
            failed.append(t)
        pump.join()
    if failed:
        raise SystemExit(f"[foxp2-demo] target(s) {failed} failed (output above, prefixed "
                         "with the target); re-run the same command to resume")
    rows = []
    for t, (_, _, spec) in children.items():
        rows += [{**r, "parallel": True} for r in json.loads(spec.read_text())["timings"]]
    return rows


def run_target_stages(spec_file: str) -> None:
    """A child of :func:`run_targets_in_parallel`: one target's stages, in this process with
    one shared model; its timing rows written back to ``spec_file``."""
    import logging

    import torch

    # the stages' progress lines, formatted as the Hydra apps log them (no Hydra app here)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    spec = json.loads(Path(spec_file).read_text())
    data = spec["config"]
    cfg = DemoAppConfig(**{**data, "compare": CompareConfig(**data["compare"]),
                           "targets": [spec["target"]], "parallel_targets": False})
    torch.set_num_threads(spec["threads"])
    base = _folder(cfg).resolve()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    shared = SharedModel([f"model={cfg.model}"]) if cfg.in_process else None
    rows = [run_stage(cfg, stage, base / "cache", env, shared)
            for stage in demo_plan(cfg, base) if stage.target == spec["target"]]
    Path(spec_file).write_text(json.dumps({**spec, "timings": rows}))


def run_demo(cfg) -> dict:
    """Every stage in order (finished ones skipped; with ``parallel_targets`` the targets'
    stages at the same time); writes and prints demo_summary.json."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    base = _folder(cfg).resolve()
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()
    shared = SharedModel([f"model={cfg.model}"]) if cfg.in_process else None
    plan = demo_plan(cfg, base)
    parallel = cfg.parallel_targets and len(cfg.targets) > 1
    timings = [run_stage(cfg, stage, base / "cache", env, shared)
               for stage in plan if not (parallel and stage.target)]
    if parallel:
        timings += run_targets_in_parallel(cfg, base, env)
    total = time.perf_counter() - started
    summary = {"model": cfg.model, "targets": cfg.targets, "folder": str(base),
               "stages": timings, "total_seconds": total, "reports": {}}
    for t in cfg.targets:
        row = report_summary(base, t)
        if row is not None:
            summary["reports"][t] = row
    (base / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="demo")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
