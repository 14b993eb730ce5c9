"""Difference spectra on planted structure, the window rule, and the stage's PNG plots."""

from __future__ import annotations

import math

import pytest
import torch

from steering.localise.lift import rank_features
from steering.localise.plots import (plot_eigengap_reff, plot_selectivity_vs_lift, plot_spectra,
                                     plot_top_features, plot_window_scores)
from steering.localise.spectra import (analyse_differences, cyclic_derangement, effective_rank,
                                       eigengap, layer_spectra, layer_spectrum)
from steering.localise.window import WindowError, choose_window, window_from_spectra

N_PAIRS, WIDTH = 200, 120
SUPPORT = torch.arange(20, 32)  # |N| = 12 of 120 columns


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_codes(kind: str, seed: int = 0):
    """English codes with a large per-pair spread; target = English + planted difference
    (+ noise 0.05) inside the support. ``rank2``: two orthogonal directions with zero-mean,
    equal-variance coefficients; ``rank1``: one fixed mean shift for every pair."""
    g = torch.Generator().manual_seed(seed)
    z_en = 3.0 * torch.randn(N_PAIRS, WIDTH, generator=g)
    diff = torch.zeros(N_PAIRS, WIDTH)
    if kind == "rank2":
        u = torch.linalg.qr(torch.randn(len(SUPPORT), 2, generator=g))[0]
        diff[:, SUPPORT] = 4.0 * torch.randn(N_PAIRS, 2, generator=g) @ u.T
    else:
        diff[:, SUPPORT] = 2.0 * torch.randn(len(SUPPORT), generator=g)
    z_t = z_en + diff + 0.05 * torch.randn(N_PAIRS, WIDTH, generator=g)
    return z_t, z_en


def test_rank2_difference_has_eigengap_2_and_reff_2():
    z_t, z_en = planted_codes("rank2")
    spec = layer_spectrum(z_t, z_en, SUPPORT, layer=4, n_boot=30, seed=0)
    assert spec.eigengap_index == 2 and spec.rank == 2
    assert spec.eigengap_ratio > 20  # σ_2 / σ_3: signal over noise
    assert abs(spec.r_eff - 2.0) < 0.1  # equal-variance planted directions: r_eff ≈ 2
    assert spec.mass > 0.99
    assert spec.stability > 0.99
    assert spec.support_size == 12 and spec.n_pairs == N_PAIRS
    null = spec.nulls["shuffled_pairs"]
    assert null.rank == 2 and null.mass < 0.45  # unmatched pairs: the English spread dominates
    assert null.r_eff > 5
    assert spec.nulls["random_support"].mass < spec.mass - 0.1
    d = spec.to_dict()
    assert d["eigengap_index"] == 2 and len(d["sigma"]) == 12 and "shuffled_pairs" in d["nulls"]
    again = layer_spectrum(z_t, z_en, SUPPORT, layer=4, n_boot=30, seed=0)
    assert again.stability == spec.stability  # seeded


def test_rank1_mean_shift_is_the_mean():
    z_t, z_en = planted_codes("rank1")
    spec = layer_spectrum(z_t, z_en, SUPPORT, n_boot=20)
    assert spec.eigengap_index == 1
    assert spec.mean_alignment > 0.999  # ‖Pμ‖/‖μ‖: the top direction is the mean
    assert spec.mass > 0.99 and spec.r_eff < 1.05
    assert spec.stability > 0.99


def test_statistics_on_hand_spectra_and_both_decompositions():
    i_star, ratios = eigengap(torch.tensor([10.0, 9.0, 1.0, 0.9]))
    assert i_star == 2
    torch.testing.assert_close(ratios, torch.tensor([10 / 9, 9.0, 1 / 0.9], dtype=torch.float64))
    assert eigengap(torch.tensor([5.0, 0.0, 0.0]))[0] == 1  # a zero σ is floored, not a NaN
    assert math.isclose(effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])), 3.0)
    assert math.isclose(effective_rank(torch.tensor([2.0])), 1.0)
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(30, 100, generator=g) + torch.randn(100, generator=g)  # n < |N|
    gram = analyse_differences(delta, n_boot=10, seed=3, method="gram")
    svd = analyse_differences(delta, n_boot=10, seed=3, method="svd")
    torch.testing.assert_close(gram["sigma"], svd["sigma"])
    for key in ("eigengap_index", "rank", "r_eff", "mass", "stability", "mean_alignment"):
        assert math.isclose(gram[key], svd[key], rel_tol=1e-6, abs_tol=1e-9), key
    perm = cyclic_derangement(7, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(7)) and (perm != torch.arange(7)).all()
    with pytest.raises(ValueError, match="zero"):
        layer_spectrum(torch.ones(5, 4), torch.ones(5, 4))


# --------------------------------------------------------------------------- window
def test_window_picks_the_planted_block():
    values = {l: 0.1 for l in range(12)}
    values.update({5: 0.8, 6: 0.85, 7: 0.8})
    gains = {l: 0.01 * l for l in range(12)}
    choice = choose_window(values, causal_gain=gains)
    assert choice.layers == [5, 6, 7] and not choice.flagged
    assert math.isclose(choice.score, (0.8 + 0.85 + 0.8) / 3)
    # 10 starts × widths 3–6, fewer near the end: every candidate is kept with its gains
    assert len(choice.candidates) == sum(min(6, 12 - s) - 2 for s in range(10))
    best = [c for c in choice.candidates if c.layers == [5, 6, 7]][0]
    assert best.causal_gain == [0.05, 0.06, 0.07]
    d = choice.to_dict()
    assert d["layers"] == [5, 6, 7] and d["candidates"][0]["causal_gain"] == [0.0, 0.01, 0.02]


def test_mean_not_sum_and_ties_go_narrow():
    values = {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.0, 7: 0.0}
    choice = choose_window(values)
    assert choice.layers == [0, 1, 2]  # the 6-wide 0–5 has the larger sum (4.2 > 2.7)
    flat = {l: (0.7 if 2 <= l <= 7 else 0.1) for l in range(10)}
    tie = choose_window(flat)
    assert tie.layers == [2, 3, 4]  # 3, 4, 5 and 6 wide all score 0.7: the narrowest wins
    with_null = choose_window({0: 0.9, 1: 0.9, 2: 0.9, 3: 0.8, 4: 0.8, 5: 0.8},
                              null_values={0: 0.6, 1: 0.6, 2: 0.6, 3: 0.1, 4: 0.1, 5: 0.1})
    assert with_null.layers == [3, 4, 5]  # the null-corrected mean decides


def test_degenerate_scores_are_flagged_not_resolved_silently():
    zeros = {l: 0.0 for l in range(8)}
    with pytest.raises(WindowError, match="nothing to localise"):
        choose_window(zeros)
    flagged = choose_window(zeros, on_degenerate="flag")
    assert flagged.flagged and flagged.layers == [] and flagged.candidates
    same = choose_window({l: 0.4 for l in range(8)})
    assert same.flagged and same.layers == [0, 1, 2] and "same score" in same.warnings[0]
    worse = choose_window({l: 0.2 for l in range(4)}, null_values={l: 0.3 for l in range(4)})
    assert worse.flagged and any("null" in w for w in worse.warnings)
    with pytest.raises(WindowError, match="contiguous"):
        choose_window({0: 1.0, 1: 1.0, 3: 1.0, 4: 1.0})


# --------------------------------------------------------------------------- plots
def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_every_plot_writes_a_png(tmp_path):
    spectra = layer_spectra({l: planted_codes("rank2" if l % 2 else "rank1", seed=l)
                             for l in range(4)},
                            supports={l: SUPPORT for l in range(4)}, n_boot=5, n_null=2,
                            null_boot=3)
    choice = window_from_spectra(spectra, null="random_support",
                                 causal_gain={l: 0.1 * l for l in range(4)})
    assert choice.layers and set(choice.layers) <= set(range(4)) and choice.null_values
    plain = window_from_spectra(spectra)
    assert plain.null_values is None
    assert math.isclose(plain.score, sum(spectra[l].mass_stab for l in plain.layers)
                        / len(plain.layers))
    sel = torch.tensor([1.5, 0.8, 0.3, 0.1, -0.2])
    slope = torch.tensor([0.9, -0.4, 0.5, 0.05, 1.0])
    ranking = rank_features([7, 3, 11, 2, 40], sel, slope)
    rows = [{"feature": int(f), "sel": float(s), "slope": float(l), "score": float(sc),
             "top tokens": ["▁el", "▁la", "की", " que"]}
            for f, s, l, sc in zip(ranking.feature_ids, ranking.selectivity, ranking.slope,
                                   ranking.score)]
    paths = [
        plot_spectra(spectra, tmp_path / "plots" / "spectra.png"),
        plot_eigengap_reff(spectra, tmp_path / "eigengap.png"),
        plot_window_scores(choice, tmp_path / "window.png"),
        plot_selectivity_vs_lift(ranking.selectivity, ranking.slope, tmp_path / "scatter.png",
                                 feature_ids=ranking.feature_ids, selected=ranking.selected),
        plot_top_features(rows, tmp_path / "top.png", title="Top features (es)"),
    ]
    assert all(_is_png(p) for p in paths), [p.stat().st_size for p in paths]
    flagged = choose_window({l: 0.0 for l in range(5)}, on_degenerate="flag")
    assert _is_png(plot_window_scores(flagged, tmp_path / "flagged.png"))
