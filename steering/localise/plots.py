"""PNG plots of the localisation stage (matplotlib, Agg canvas: no display, no global state).

Every function takes the stage's results, writes one PNG at ``path`` (parent folders created)
and returns the path.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with warnings.catch_warnings():  # tokens in scripts the default font lacks (Devanagari …)
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


_SCRIPT_FONTS = ("DejaVu Sans", "Noto Sans Devanagari", "Lohit Devanagari", "Mangal",
                 "Noto Sans", "Arial Unicode MS")


def _text_fonts() -> list[str]:
    """Installed fonts for token text, in fallback order (Devanagari where one exists)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [name for name in _SCRIPT_FONTS if name in installed] or ["sans-serif"]


def _by_layer(spectra) -> list:
    items = list(spectra.values()) if isinstance(spectra, Mapping) else list(spectra)
    if not items:
        raise ValueError("no layer spectra to plot")
    return sorted(items, key=lambda s: (s.layer is None, s.layer or 0))


def plot_spectra(spectra, path: str | Path, max_components: int = 20,
                 null: str = "shuffled_pairs") -> Path:
    """σ_i / σ_1 (log scale) per layer, one panel each, with the ``null`` spectrum dashed and
    the chosen rank r marked. ``spectra``: {layer: LayerSpectrum} or a sequence of them."""
    items = _by_layer(spectra)
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    for i, spec in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        s = spec.sigma_normalised[:max_components].clamp(min=1e-12)
        ax.semilogy(range(1, len(s) + 1), s.tolist(), "o-", ms=3, label="pairs")
        if null in spec.nulls:
            ns = spec.nulls[null].sigma_normalised[:max_components].clamp(min=1e-12)
            ax.semilogy(range(1, len(ns) + 1), ns.tolist(), "--", color="grey", label=null)
        ax.axvline(spec.rank + 0.5, color="tab:red", lw=0.8)
        ax.set_title(f"layer {spec.layer}: r={spec.rank}, Mass={spec.mass:.2f}", fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.set_ylabel("σ_i / σ_1", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Paired-difference spectra")
    fig.tight_layout()
    return _save(fig, path)


def plot_eigengap_reff(spectra, path: str | Path) -> Path:
    """Eigengap index i*, effective rank r_eff and Mass·Stab by layer."""
    items = _by_layer(spectra)
    layers = [s.layer for s in items]
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(layers, [s.eigengap_index for s in items], "o-", label="eigengap i*")
    ax.plot(layers, [s.r_eff for s in items], "s-", label="r_eff")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank")
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(layers, [s.mass_stab for s in items], "o-", label="Mass·Stab")
    for kind in sorted({k for s in items for k in s.nulls}):
        ax2.plot(layers, [s.nulls[kind].mass_stab if kind in s.nulls else float("nan")
                          for s in items], "--", label=f"null: {kind}")
    ax2.set_xlabel("layer")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_window_scores(choice, path: str | Path) -> Path:
    """Every candidate window's score (one line per width, by start layer), the chosen window
    starred, and per-layer Mass·Stab (with the null) and causal gain below."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.add_subplot(2, 1, 1)
    for width in sorted({c.width for c in choice.candidates}):
        cands = [c for c in choice.candidates if c.width == width]
        ax.plot([c.start for c in cands], [c.score for c in cands], "o-", ms=3,
                label=f"width {width}")
    if choice.layers:
        ax.plot([choice.start], [choice.score], "*", ms=14, color="black",
                label=f"chosen {choice.start}–{choice.end}")
    ax.set_xlabel("window start layer")
    ax.set_ylabel("score")
    ax.set_title("Window scores" + (" (FLAGGED)" if choice.flagged else ""))
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(2, 1, 2)
    layers = sorted(choice.layer_values)
    ax2.bar(layers, [choice.layer_values[l] for l in layers], color="tab:blue",
            label="Mass·Stab")
    if choice.null_values is not None:
        ax2.plot(layers, [choice.null_values[l] for l in layers], "k--", label="null")
    if choice.causal_gain:
        gl = sorted(choice.causal_gain)
        ax3 = ax2.twinx()
        ax3.plot(gl, [choice.causal_gain[l] for l in gl], "o-", color="tab:orange",
                 label="causal gain")
        ax3.set_ylabel("single-layer causal gain")
    for l in choice.layers:
        ax2.axvspan(l - 0.5, l + 0.5, color="tab:green", alpha=0.15)
    ax2.set_xlabel("layer")
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_selectivity_vs_lift(selectivity: torch.Tensor | Sequence[float],
                             slope: torch.Tensor | Sequence[float], path: str | Path,
                             feature_ids: Sequence[int] | None = None,
                             selected: Sequence[int] | None = None, label_top: int = 5) -> Path:
    """Scatter of Sel (x) against LiftSlope (y) of the verified features; ``selected``
    features highlighted, the ``label_top`` best by Score labelled with their id."""
    sel = torch.as_tensor(selectivity, dtype=torch.float32).reshape(-1)
    lift = torch.as_tensor(slope, dtype=torch.float32).reshape(-1)
    if sel.shape != lift.shape or sel.numel() == 0:
        raise ValueError(f"need equal non-empty selectivity and slope; got {tuple(sel.shape)}, "
                         f"{tuple(lift.shape)}")
    ids = list(range(len(sel))) if feature_ids is None else [int(i) for i in feature_ids]
    chosen = set() if selected is None else {int(i) for i in selected}
    mark = torch.tensor([i in chosen for i in ids])
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(sel[~mark].tolist(), lift[~mark].tolist(), s=12, alpha=0.6, label="screened")
    if mark.any():
        ax.scatter(sel[mark].tolist(), lift[mark].tolist(), s=30, color="tab:red",
                   label="selected")
    score = sel.clamp(min=0) * lift.clamp(min=0)
    for j in torch.sort(score, descending=True, stable=True).indices[:label_top].tolist():
        if score[j] > 0:
            ax.annotate(str(ids[j]), (float(sel[j]), float(lift[j])), fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("selectivity Sel")
    ax.set_ylabel("lift slope (ΔM per unit α)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_top_features(rows: Sequence[Mapping], path: str | Path,
                      columns: Sequence[str] | None = None,
                      title: str = "Top features") -> Path:
    """A text table figure, one row per feature (e.g. feature, sel, slope, score, top tokens).
    Floats are shown with 3 significant digits; long cells are cut at 60 characters."""
    if not rows:
        raise ValueError("no feature rows to tabulate")
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        if isinstance(v, float):
            text = f"{v:.3g}"
        elif isinstance(v, (list, tuple)):
            text = " ".join(repr(x) if isinstance(x, str) else str(x) for x in v)
        else:
            text = str(v)
        return text if len(text) <= 60 else text[:57] + "…"

    table = [[cell(r.get(c, "")) for c in columns] for r in rows]
    fig = Figure(figsize=(max(4, 1.2 * len(columns) + 2), 0.35 * (len(rows) + 2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    tab = ax.table(cellText=table, colLabels=columns, loc="center", cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    fonts = _text_fonts()
    for text_cell in tab.get_celld().values():
        text_cell.get_text().set_fontfamily(fonts)
    tab.auto_set_column_width(list(range(len(columns))))
    ax.set_title(title)
    return _save(fig, path)
