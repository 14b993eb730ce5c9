"""The localisation's tensor file and plots (formats: :mod:`steering.localise.run`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from steering.localise.layer import LayerResult
from steering.localise.window import WindowChoice


def write_directions(path: Path, results: dict[int, LayerResult], window: list[int],
                     meta: dict[str, str]) -> Path:
    """``directions.safetensors`` (format in the module docstring)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {
        "window": torch.tensor(window, dtype=torch.long),
        "layers": torch.tensor(sorted(results), dtype=torch.long),
    }
    for layer, r in results.items():
        p = f"layers.{layer}."
        sel_ids = r.ranking.selected
        trace = r.trace
        tensors.update({
            p + "feature_ids": sel_ids.long(),
            p + "feature_scores": r.ranking.score[: r.ranking.k].float(),
            p + "decoder": r.decoder[sel_ids].float(),
            p + "encoder": r.encoder[sel_ids].float(),
            p + "mean_direction": r.mean_direction.float(),
            p + "mu_target": r.codes.target.float().mean(0),
            p + "mu_english": r.codes.english.float().mean(0),
            p + "support": r.support.long(),
            p + "basis": r.basis.float(),
            p + "target_neurons": (trace.target_neurons if trace is not None
                                   else torch.zeros(0)).long(),
            p + "english_neurons": (trace.english_neurons if trace is not None
                                    else torch.zeros(0)).long(),
            p + "neuron_mu_target": r.act_means[0].float(),
            p + "neuron_mu_english": r.act_means[1].float(),
            p + "typical_norm": torch.tensor([r.scale], dtype=torch.float32),
            p + "english_feature_ids": r.english_ids.long(),
            p + "english_encoder": r.encoder[r.english_ids].float(),
            p + "english_bias": r.encoder_bias[r.english_ids].float(),
            p + "english_decoder": r.decoder[r.english_ids].float(),
            p + "support_decoder": r.decoder[r.support].float(),
            p + "support_encoder": r.encoder[r.support].float(),
            p + "support_bias": r.encoder_bias[r.support].float(),
        })
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def write_plots(plots: Path, results: dict[int, LayerResult], choice: WindowChoice | None,
                per_layer: bool = True) -> dict[str, str]:
    """The stage's PNGs; ``per_layer=False`` leaves out the per-layer selectivity-vs-lift
    plots and the neuron spectra (the slow ones on an 18-layer model)."""
    from steering.localise import plots as P

    written: dict[str, str] = {}
    spectra = {l: r.spectrum for l, r in results.items() if r.spectrum is not None}
    if spectra:
        written["spectra"] = str(P.plot_spectra(spectra, plots / "spectra.png"))
        written["eigengap_reff"] = str(P.plot_eigengap_reff(spectra, plots / "eigengap_reff.png"))
    neuron = {l: r.neuron_spectrum for l, r in results.items() if r.neuron_spectrum is not None}
    if neuron and per_layer:
        written["neuron_spectra"] = str(P.plot_spectra(neuron, plots / "neuron_spectra.png"))
    if choice is not None:
        written["window_scores"] = str(P.plot_window_scores(choice, plots / "window_scores.png"))
    for layer, r in results.items():
        if per_layer and len(r.ranking.feature_ids):
            out = plots / "selectivity_vs_lift" / f"layer_{layer}.png"
            written[f"selectivity_vs_lift/layer_{layer}"] = str(P.plot_selectivity_vs_lift(
                r.ranking.selectivity, r.ranking.slope, out,
                feature_ids=r.ranking.feature_ids.tolist(), selected=r.ranking.selected.tolist()))
    shown = choice.layers if choice is not None and choice.layers else sorted(results)
    rows = [{"layer": l, "feature": f["feature"], "sel": f["sel"], "slope": f["slope"],
             "score": f["score"], "top tokens": [t.strip() or repr(t) for t in f["top_tokens"]]}
            for l in shown for f in results[l].top_features]
    if rows:
        written["top_features"] = str(P.plot_top_features(
            rows, plots / "top_features.png", title="Top features (window layers)"))
    return written
