"""`foxp2-demo`: the whole pipeline in one command (Hydra app).

    foxp2-demo                                  # Gemma-3-270m, embedded corpus, es + hi, CPU
    foxp2-demo 'targets=[hi]' force='[steer]'   # redo only Hindi's steer stage
    foxp2-demo model=tiny_llama preset=tiny     # seconds-scale run on the tiny model (tests, CI)

Stages, each the real app run as a subprocess with the overrides of ``conf/demo.yaml`` (so each
stage can be re-run alone with the same command line, printed before it starts)::

    sae-cache      → <root>/demo/<model>/cache
    sae-train      → <root>/demo/<model>/saes/layers.{i}.resid/    (every layer's SAE, one run)
    foxp2-localise → <root>/demo/<model>/localise-<t>/              (per target)
    foxp2-steer    → <root>/demo/<model>/steer-<t>/{artifacts,report}/

A stage whose outputs exist is skipped (``force=[stage,…]`` redoes it); an interrupted stage
resumes (the cache by shard, the steer stage by method). Wall time per stage is printed as a
table at the end and written to ``<root>/demo/<model>/demo_summary.json``.
"""

from __future__ import annotations

import json
import os
import shlex
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
    # Stages to recompute even when their outputs exist.
    force: list[str] = field(default_factory=list)
    # Per-stage wall-clock limit in seconds (null: none).
    stage_timeout: int | None = None

    def __post_init__(self):
        bad = sorted(set(self.force) - set(STAGES))
        if bad:
            raise ValueError(f"force={self.force}: unknown stages {bad}; use {list(STAGES)}")
        if not self.targets:
            raise ValueError("targets=[] selects nothing; give e.g. targets=[es,hi]")


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


def _cached_layers(cache: Path) -> int | None:
    m = cache / "manifest.json"
    if not m.is_file():
        return None
    return sum(1 for s in json.loads(m.read_text())["sites"] if str(s).endswith(".resid"))


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
                                               *cfg.localise]))
        plan.append(Stage("steer", t, base / f"steer-{t}",
                          [*common, f"target={t}", f"cache_dir={cache}", f"localise_dir={loc}",
                           f"out_dir={base / f'steer-{t}'}", *cfg.steer]))
    return plan


def run_stage(cfg, stage: Stage, cache: Path, env: dict) -> dict:
    """Run one stage as a subprocess (skipped when its outputs exist); its timing row."""
    label = stage.label
    if stage.stage not in cfg.force and _done(stage.stage, stage.out, _cached_layers(cache)):
        print(f"[foxp2-demo] {label}: outputs exist in {stage.out}, skipped", flush=True)
        return {"stage": label, "seconds": 0.0, "skipped": True}
    cmd = [sys.executable, "-c", f"from {MODULES[stage.stage]} import main; main()",
           *stage.args]
    if stage.stage in ("localise", "steer") and stage.stage in cfg.force:
        cmd.append("resume=false")
    print(f"[foxp2-demo] {label}: {shlex.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, timeout=cfg.stage_timeout)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"[foxp2-demo] stage {label} failed (exit {result.returncode}); "
                         f"re-run the same command to resume")
    return {"stage": label, "seconds": seconds, "skipped": False}


def report_summary(base: Path, target: str) -> dict | None:
    """The primary method's numbers from a target's report.json (None before it exists)."""
    rep = base / f"steer-{target}" / "report" / "report.json"
    if not rep.is_file():
        return None
    r = json.loads(rep.read_text())
    p = r["methods"][r["primary"]]["metrics"]
    return {"report": str(rep.with_suffix(".md")), "window": r["window"],
            "primary": r["primary"], "default": p["default"]["mean"],
            "nll_change_gen": p["nll_change_gen"]["mean"],
            "native_default": r["methods"].get("native", {}).get("metrics", {})
            .get("default", {}).get("mean"),
            "bars": r.get("bars", [])}


def print_summary(summary: dict) -> None:
    print("\n[foxp2-demo] stage           seconds")
    for row in summary["stages"]:
        print(f"[foxp2-demo] {row['stage']:<15} {row['seconds']:8.1f}"
              f"{'  (skipped: outputs exist)' if row['skipped'] else ''}")
    print(f"[foxp2-demo] total           {summary['total_seconds']:8.1f}")
    for t, r in summary["reports"].items():
        print(f"[foxp2-demo] {t}: window {r['window']}, {r['primary']} DEFAULT "
              f"{r['default']:.2f}, ΔNLL(gen) {r['nll_change_gen']:+.3f}"
              + ("" if r["native_default"] is None
                 else f" (asked in {t}: {r['native_default']:.2f})") + f" → {r['report']}")


def run_demo(cfg) -> dict:
    """Every stage in order (finished ones skipped); writes and prints demo_summary.json."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    base = _folder(cfg).resolve()
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()
    timings = [run_stage(cfg, stage, base / "cache", env) for stage in demo_plan(cfg, base)]
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
