"""``report.json`` → ``report.md`` (the table with CIs) and PNG plots, and the wandb log."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# (key in the method's metrics, column title, format)
COLUMNS = (("default", "DEFAULT", "{:.2f}"), ("relevance", "relevant", "{:.2f}"),
           ("lid_full", "LID full", "{:.2f}"), ("lid_first_line", "LID 1st line", "{:.2f}"), ("delta_m", "ΔM", "{:+.3f}"),
           ("kl_gen", "KL gen", "{:.3f}"), ("kl_all", "KL all", "{:.3f}"),
           ("nll_change_gen", "ΔNLL gen", "{:+.3f}"), ("nll_change_all", "ΔNLL all", "{:+.3f}"),
           ("leak", "leak", "{:.2f}"), ("looping", "looping", "{:.2f}"),
           ("script_fraction", "script", "{:.2f}"))


def _cell(ci: dict, fmt: str) -> str:
    value = ci.get("mean") if isinstance(ci, dict) else ci
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = fmt.format(value)
    lo, hi = ci.get("low"), ci.get("high")
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return text


def _objective(report: dict) -> str:
    objective = report.get("settings", {}).get("tuning", {}).get("objective", "delta_m")
    return "guarded DEFAULT (ties by ΔM)" if objective == "default" else "ΔM"


def _guard_line(report: dict) -> str:
    limit = report.get("settings", {}).get("guards", {}).get("max_nll_increase")
    if limit is None:
        return ""
    offset = report.get("nll_guard_offset") or 0.0
    return (f" NLL guard: a continuation may cost the unsteered model at most {limit:g} "
            f"{'+ the language offset ' + format(offset, '+.2f') + ' ' if offset else ''}"
            "nats/token more than the unsteered continuation.")


def decoding_text(evaluation: dict) -> str:
    """The headline decoding in words, from the evaluation settings."""
    penalty = evaluation.get("repetition_penalty", 1.0)
    ngram = evaluation.get("no_repeat_ngram_size", 0)
    extras = ([f"repetition penalty {penalty:g}"] if penalty != 1.0 else []) + \
        ([f"no repeated {ngram}-gram (no_repeat_ngram_size={ngram})"] if ngram else [])
    return "greedy" + (" with " + " and ".join(extras) if extras else "")


def _decoding_line(report: dict) -> str:
    return f" Decoding: {decoding_text(report.get('settings', {}).get('evaluation', {}))}."


# Columns of the plain-greedy table (a subset: the guards' verdicts and the fluency cost).
GREEDY_COLUMNS = ("default", "relevance", "lid_full", "kl_gen", "nll_change_gen", "looping",
                  "script_fraction")


def _plain_greedy_table(report: dict) -> list[str]:
    """The final artifacts re-evaluated under plain greedy (no re-tuning), when present."""
    table = report.get("plain_greedy")
    if not table:
        return []
    cols = [c for c in COLUMNS if c[0] in GREEDY_COLUMNS]
    out = ["", "## Plain greedy (final artifacts, no re-tuning)", "",
           f"Every steer at the strengths tuned under the headline decoding, decoded "
           f"{table['decoding']}; the relevance threshold is the headline one.", "",
           "| method | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, metrics in table["methods"].items():
        out.append(f"| {name} | " + " | ".join(_cell(metrics.get(k, {}), fmt)
                                                for k, _, fmt in cols) + " |")
    return out


def markdown(report: dict) -> str:
    t = report["target"]
    lines = [f"# Steering report: English → {t} on {report.get('model', '?')}", "",
             f"Evaluation split: {report['n_prompts']} neutral English prompts, "
             f"{report['n_sentences']} held-out {t} sentences; 95% CIs in brackets (Wilson for "
             "rates, bootstrap for means). "
             f"Tuning: max {_objective(report)} with KL_gen ≤ {report['kl_budget']} nats/token "
             "on the tuning split. "
             "`gen` = steered as in generation (prompt end + first decode steps; a sentence's "
             "first token stands for the prompt end), `all` = every position steered."
             + _guard_line(report) + _decoding_line(report), "",
             "| method | λ | β | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, m in report["methods"].items():
        s = m.get("strengths", {})
        cells = [_cell(m["metrics"].get(k, {}), fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {name} | {s.get('lam', '–')} | {s.get('beta', '–')} | "
                     + " | ".join(cells) + " |")
    native = report["methods"].get("native")
    if native:
        lines += ["", f"`native` is a reference, not a steer: {native.get('reference', '')}; "
                  f"{native['metrics']['n_prompts']} of the {report['n_prompts']} evaluation "
                  "prompts have a translation. Its DEFAULT is the most the guards allow this "
                  "model under this decoding."]
    lines += _failure_table(report) + _plain_greedy_table(report) + _scan_tables(report)
    bars = report.get("bars")
    if bars:
        lines += ["", "## Bars", ""]
        for b in bars:
            lines.append(f"- {'MET' if b['met'] else 'NOT MET'}: {b['text']}")
        lines += _native_bar_lines(report)
    frontier = report.get("frontier")
    if frontier:
        lines += ["", "## KL–DEFAULT frontier (γ sweep on the frontier subset)", "",
                  "| method | γ | DEFAULT | KL gen |", "|---|---|---|---|"]
        for name, pts in frontier.items():
            for p in pts:
                lines.append(f"| {name} | {p['gamma']} | {p['default']:.2f} | {p['kl']:.3f} |")
    lines += ["", "## Examples (first prompts)", ""]
    for name, m in report["methods"].items():
        ex = m["metrics"].get("examples", [])[:3]
        if not ex:
            continue
        lines.append(f"**{name}**")
        for e in ex:
            cont = e["continuation"].replace("\n", " ⏎ ")[:160]
            lines.append(f"- {e['prompt']} → {cont}")
        lines.append("")
    if report.get("findings"):
        lines += ["## Findings", ""] + [f"- {f}" for f in report["findings"]]
    return "\n".join(lines) + "\n"


def native_ceiling(report: dict) -> dict | None:
    """The native reference's DEFAULT (mean, low, high), or None without that row."""
    native = report["methods"].get("native")
    return native["metrics"]["default"] if native else None


def _native_bar_lines(report: dict) -> list[str]:
    """Each DEFAULT bar set against what the model does when asked in the target language."""
    ceiling = native_ceiling(report)
    if ceiling is None:
        return []
    out = []
    for b in report.get("bars", []):
        if b["metric"] != "default":
            continue
        where = "above" if b["bound"] > ceiling["high"] else \
            ("within the CI of" if b["bound"] >= ceiling["low"] else "below")
        out.append(f"- Reference: asked in {report['target']}, the unsteered model reaches "
                   f"DEFAULT {ceiling['mean']:.2f} [{ceiling['low']:.2f}, {ceiling['high']:.2f}]"
                   f"; the bar {b['bound']:g} is {where} that ceiling.")
    return out


def _failure_table(report: dict) -> list[str]:
    """Why each method's continuations miss DEFAULT (steering.evaluate.harness.default_failures)."""
    rows = {name: m["metrics"]["default_failures"] for name, m in report["methods"].items()
            if m["metrics"].get("default_failures")}
    if not rows:
        return []
    reasons = list(dict.fromkeys(r for f in rows.values() for r in f))
    out = ["", "## Where DEFAULT fails", "",
           "Fraction of the evaluation prompts failing each condition (not exclusive): "
           "`delta_m` ΔM ≤ 0, `language` first 16 tokens not identified as the target, then "
           "the fluency guards (steering/evaluate/judge.py states the thresholds).", "",
           "| method | DEFAULT | " + " | ".join(reasons) + " |", "|---|---|" + "---|" * len(reasons)]
    for name, f in rows.items():
        d = report["methods"][name]["metrics"]["default"]["mean"]
        out.append(f"| {name} | {d:.2f} | " + " | ".join(f"{f.get(r, float('nan')):.2f}" for r in reasons) + " |")
    return out


def _scan_tables(report: dict) -> list[str]:
    """The window scan and caa_layer's layer scan (tuning split)."""
    out = []
    scan = report.get("window_scan") or []
    if scan:
        out += ["", "## Window scan (primary method, tuning split)", "",
                "| window | λ | β | ΔM | KL gen | within budget | |", "|---|---|---|---|---|---|---|"]
        for r in scan:
            mark = "chosen" if r["window"] == report.get("window") else \
                ("localised" if r.get("localised") else "")
            out.append(f"| {r['window']} | {r['lam']} | {r['beta']} | {r['delta_m']:+.3f} | "
                       f"{r['kl']:.3f} | {'yes' if r['within_budget'] else 'no'} | {mark} |")
    layer_scan = report["methods"].get("caa_layer", {}).get("layer_scan") or []
    if layer_scan:
        out += ["", "## caa_layer's layer scan (tuning split)", "",
                "| layer | λ | ΔM | KL gen | within budget | |", "|---|---|---|---|---|---|"]
        for r in layer_scan:
            out.append(f"| {r['layer']} | {r['lam']} | {r['delta_m']:+.3f} | {r['kl']:.3f} | "
                       f"{'yes' if r['within_budget'] else 'no'} | "
                       f"{'chosen' if r['chosen'] else ''} |")
    return out


def _save_png(fig, path: Path) -> str:
    """Write ``fig`` (pyplot) at ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_frontier(report: dict, frontier: dict, folder: Path) -> dict[str, str]:
    """frontier.png (KL vs DEFAULT per method, native ceiling) and default_vs_gamma.png."""
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in frontier.items():
        ax.plot([p["kl"] for p in pts], [p["default"] for p in pts], "o-", label=name)
    ceiling = native_ceiling(report)
    if ceiling is not None:
        ax.axhline(ceiling["mean"], color="tab:gray", ls="--", lw=1,
                   label=f"native (asked in {report['target']})")
    ax.set_xlabel("KL(steered ‖ base), nats/token (gen positions)")
    ax.set_ylabel("DEFAULT rate")
    ax.set_title(f"KL–DEFAULT frontier ({report['target']})")
    ax.legend(fontsize=7)
    out["frontier"] = _save_png(fig, folder / "frontier.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in frontier.items():
        ax.plot([p["gamma"] for p in pts], [p["default"] for p in pts], "o-", label=name)
    ax.set_xlabel("γ (× tuned strengths)")
    ax.set_ylabel("DEFAULT rate")
    ax.set_title(f"DEFAULT vs γ ({report['target']})")
    ax.legend(fontsize=7)
    out["default_vs_gamma"] = _save_png(fig, folder / "default_vs_gamma.png")
    return out


def plot_layer_gains(report: dict, gains: dict, folder: Path) -> str:
    """layer_gains.png: each layer's single-layer causal gain, the window in orange."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = sorted(gains, key=int)
    window = set(report.get("window", []))
    ax.bar([int(l) for l in layers], [gains[l] or 0 for l in layers],
           color=["tab:orange" if int(l) in window else "tab:blue" for l in layers])
    ax.set_xlabel("layer (orange: window)")
    ax.set_ylabel("single-layer causal gain (ΔM lift)")
    ax.set_title(f"Per-layer gains ({report['target']})")
    return _save_png(fig, folder / "layer_gains.png")


def plot_default_by_method(report: dict, folder: Path) -> str:
    """default_by_method.png: DEFAULT with its CI per method, the native ceiling and the bar."""
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(methods)
    vals = [methods[n]["metrics"]["default"]["mean"] for n in names]
    err = [[v - methods[n]["metrics"]["default"]["low"] for n, v in zip(names, vals)],
           [methods[n]["metrics"]["default"]["high"] - v for n, v in zip(names, vals)]]
    ax.bar(range(len(names)), vals, yerr=err, capsize=3,
           color=["tab:gray" if n == "native" else "tab:blue" for n in names])
    ceiling = native_ceiling(report)
    if ceiling is not None:
        ax.axhline(ceiling["mean"], color="tab:gray", ls="--", lw=1,
                   label=f"native: asked in {report['target']}")
    for b in report.get("bars") or []:
        if b["metric"] == "default":
            ax.axhline(b["bound"], color="tab:red", ls=":", lw=1, label=f"bar {b['bound']:g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("DEFAULT (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"DEFAULT by method ({report['target']})")
    return _save_png(fig, folder / "default_by_method.png")


def plot_default_failures(report: dict, failures: dict, folder: Path) -> str:
    """default_failures.png: per method, the fraction of prompts failing each DEFAULT part."""
    import matplotlib.pyplot as plt

    reasons = [r for r in next(iter(failures.values()))
               if any(f[r] > 0 for f in failures.values())] or ["delta_m"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(reasons)
    for i, r in enumerate(reasons):
        ax.bar([j + i * width for j in range(len(failures))],
               [f[r] for f in failures.values()], width, label=r)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(failures))], list(failures),
                  rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("fraction of prompts failing")
    ax.set_ylim(0, 1.3)  # headroom: the legend sits above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(f"Why DEFAULT fails ({report['target']}; not exclusive)")
    ax.legend(fontsize=7, ncol=len(reasons), loc="upper center")
    return _save_png(fig, folder / "default_failures.png")


def plots(report: dict, folder: Path) -> dict[str, str]:
    """The report's PNGs in ``folder``: {name: path} of those written."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    frontier = report.get("frontier") or {}
    if frontier:
        out.update(plot_frontier(report, frontier, folder))
    gains = report.get("layer_gains") or {}
    if gains:
        out["layer_gains"] = plot_layer_gains(report, gains, folder)
    out["default_by_method"] = plot_default_by_method(report, folder)
    failures = {n: m["metrics"]["default_failures"] for n, m in report["methods"].items()
                if m["metrics"].get("default_failures")}
    if failures:
        out["default_failures"] = plot_default_failures(report, failures, folder)
    return out


def log_to_wandb(report: dict, pngs: dict[str, str], cfg: dict) -> str | None:
    """Log the table and plots to wandb (mode from cfg, offline by default); returns the dir."""
    import wandb

    run = wandb.init(project=cfg.get("project", "foxp2"), mode=cfg.get("mode", "offline"),
                     dir=cfg.get("dir"), name=cfg.get("name"), config=report.get("settings"),
                     reinit="finish_previous")
    try:
        cols = ["method", "lam", "beta"] + [k for k, _, _ in COLUMNS]
        table = wandb.Table(columns=cols)
        for name, m in report["methods"].items():
            s = m.get("strengths", {})
            table.add_data(name, s.get("lam"), s.get("beta"),
                           *[m["metrics"].get(k, {}).get("mean") for k, _, _ in COLUMNS])
        run.log({"report": table, **{f"plots/{k}": wandb.Image(v) for k, v in pngs.items()}})
        for name, m in report["methods"].items():
            run.summary[f"{name}/default"] = m["metrics"]["default"]["mean"]
        return run.dir
    finally:
        run.finish()


def write_report(report: dict, folder: Path, wandb_cfg: dict | None = None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pngs = plots(report, folder / "plots")
    report = {**report, "files": {"plots": pngs}}
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False,
                                                   default=str))
    (folder / "report.md").write_text(markdown(report))
    files = {"json": str(folder / "report.json"), "md": str(folder / "report.md"), **pngs}
    if wandb_cfg and wandb_cfg.get("enabled", False):
        try:
            files["wandb"] = str(log_to_wandb(report, pngs, wandb_cfg))
        except Exception as err:  # the report on disk is what counts; say why wandb failed
            log.warning("wandb logging failed: %s", err)
    return files
