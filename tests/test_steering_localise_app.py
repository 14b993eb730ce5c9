"""The real `foxp2-localise` Hydra app on the tiny Llama: `sae-cache` (resid + mlp sites) →
`sae-train` (one SAE per resid layer) → `foxp2-localise target=es`, each a subprocess as a user
would run them; then a resumed in-process run that takes the neurons from the model instead of
the cache, and bad input refused at start with a message that says what to do."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors import safe_open

from sae_train.cache.manifest import file_sha256
from sae_train.cache.reader import ActivationCache
from sae_train.saes import load_sae
from steering.language.token_sets import LanguageTokenSets
from steering.localise.lift import lift_cost

N_LAYERS, D_MODEL, N_NEURONS, N_LATENTS = 4, 64, 128, 256
ALPHAS = [0.25, 0.5, 1.0]
# Small settings: 12 baseline prompts, 6 lift prompts, 6 candidates per layer, 4 neurons at
# most per tail, windows of 2–4 layers (the tiny model has 4).
LOCALISE = ["model=tiny_llama", "target=es", "defaultness.n_prompts=12", "lift.n_prompts=6",
            "lift.top_m=6", f"lift.alphas=[{','.join(map(str, ALPHAS))}]", "lift.batch_size=64",
            "tracing.max_fraction=0.03", "spectra.n_boot=8", "spectra.n_null=2",
            "spectra.null_boot=4", "window.min_width=2", "window.max_width=4", "num_threads=1",
            "progress=false"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECTION_KEYS = {"feature_ids", "feature_scores", "decoder", "encoder", "mean_direction",
                  "mu_target", "mu_english", "support", "basis", "target_neurons",
                  "english_neurons", "neuron_mu_target", "neuron_mu_english", "typical_norm",
                  "english_feature_ids", "english_encoder", "english_bias", "english_decoder",
                  "support_decoder", "support_encoder", "support_bias"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(module: str, args: list[str], env: dict, timeout: int = 240):
    cmd = [sys.executable, "-c", f"from {module} import main; main()", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, foxp2_cache_root, load_tiny):
    """The three apps in a row; returns the folders and the localise run's output."""
    load_tiny("llama")  # materialise the tiny model once, before the subprocesses share it
    root = tmp_path_factory.mktemp("localise")
    env = {**os.environ, "FOXP2_CACHE": str(foxp2_cache_root), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    cache, saes, out = root / "cache", root / "saes", root / "out"
    cached = _run("sae_train.apps.cache_app", [
        "model=tiny_llama", f"paths.root={root}", "progress=false", f"cache.dir={cache}",
        "sites=[layers.*.resid,layers.*.mlp]", "data.splits=[discovery]", "cache.dtype=float32",
        "cache.shard_tokens=16384"], env)
    assert cached.returncode == 0, cached.output
    trained = _run("sae_train.apps.train_app", [
        f"cache_dir={cache}", "sites=layers.*.resid", f"out_dir={saes}", f"paths.root={root}",
        "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv", "loader.batch_size=512", "loader.stats_tokens=4096",
        f"sae.n_latents={N_LATENTS}", "sae.k=16", "optim.warmup_steps=10",
        "loader.val_splits=null", "max_tokens=50000", "num_threads=1"], env)
    assert trained.returncode == 0, trained.output
    localised = _run("steering.apps.localise_app", [
        *LOCALISE, f"paths.root={root}", f"cache_dir={cache}", f"sae_dir={saes}",
        f"out_dir={out}"], env)
    assert localised.returncode == 0, localised.output
    return {"root": root, "cache": cache, "saes": saes, "out": out, "env": env,
            "output": localised.output}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _best_window(values: dict[int, float], lo: int, hi: int) -> list[int]:
    """The window rule written out independently: best mean, ties → narrowest, earliest."""
    cands = [(sum(values[l] for l in range(s, s + w)) / w, w, s)
             for s in values for w in range(lo, hi + 1)
             if all(l in values for l in range(s, s + w))]
    best = max(c[0] for c in cands)
    _, w, s = min((c for c in cands if c[0] >= best - 1e-9), key=lambda c: (c[1], c[2]))
    return list(range(s, s + w))


def test_app_writes_every_output_with_sane_numbers(pipeline):
    out, loc = pipeline["out"], pipeline["out"] / "localise"
    summary = json.loads((loc / "summary.json").read_text())
    layers_json = json.loads((loc / "layers.json").read_text())
    cache = ActivationCache(pipeline["cache"])
    assert summary["format"] == "foxp2-localise" and summary["target"] == "es"
    assert summary["layers_analysed"] == list(range(N_LAYERS))
    assert summary["tracing_source"] == "cache"  # the cache has layers.*.mlp
    assert "tracing (cache)" in pipeline["output"]

    # Window: contiguous, 2–4 layers of 0–3, and exactly the rule applied to the layer values.
    window = summary["window"]["layers"]
    assert 2 <= len(window) <= 4 and window == list(range(window[0], window[-1] + 1))
    assert set(window) <= set(range(N_LAYERS))
    values = {int(l): row["mass_stab"] for l, row in summary["layers"].items()}
    assert window == _best_window(values, 2, 4)
    assert [int(l) for l, r in summary["layers"].items() if r["in_window"]] == window
    assert summary["window"]["causal_gain"].keys() == {str(l) for l in range(N_LAYERS)}

    assert -1 <= summary["baseline"]["mean_delta_m"] <= 1
    assert summary["baseline"]["n_prompts"] == 12 and summary["baseline"]["steps"] == 3
    for l, row in summary["layers"].items():
        rec = layers_json[l]
        assert 0 <= row["k"] <= 6 and len(row["selected"]) == row["k"]
        assert row["selected"] == rec["ranking"]["selected"]
        assert 0 <= row["n_target_neurons"] <= 4 and 0 <= row["n_english_neurons"] <= 4
        assert row["rank"] >= 1 and 1 <= row["eigengap_index"] <= 12
        assert 1 - 1e-6 <= row["r_eff"] <= row["support_size"] + 1e-6
        assert 0 < row["mass"] <= 1 + 1e-9 and 0 <= row["stability"] <= 1 + 1e-9
        assert 0 <= row["mean_alignment"] <= 1 + 1e-9
        assert row["mass_stab"] == pytest.approx(row["mass"] * row["stability"])
        assert _finite(row["causal_gain"]) and abs(row["causal_gain"]) <= 2  # ΔM ∈ [−1, 1]
        assert row["typical_norm"] > 0 and row["n_pairs"] >= 100
        assert 1 <= len(row["top_features"]) <= 5
        for f in row["top_features"]:
            assert len(f["top_tokens"]) == 8 and all(isinstance(t, str) for t in f["top_tokens"])
            assert f["score"] == pytest.approx(max(f["sel"], 0) * max(f["slope"], 0), abs=1e-7)
        for side in ("target", "english"):
            assert 0 <= row["lape_overlap"][side]["jaccard"] <= 1
        # The selectivity of the logged variant was computed too, and lift of every candidate.
        assert set(rec["selectivity"]) >= {"last", "mean"}
        assert len(rec["lift"]["slope"]) == len(rec["lift"]["feature_ids"]) <= 6
        assert rec["lift"]["alphas"] == ALPHAS
    assert summary["lape"]["source"] == "cache" and summary["lape"]["target"]["n_lape"] >= 0

    # Forward passes are counted on the model and match the documented costs.
    fwd = summary["forward_passes"]
    assert fwd["baseline"] == 3 * math.ceil(12 / 16)
    assert fwd["lift"] == sum(lift_cost(6, len(layers_json[l]["lift"]["feature_ids"]),
                                        len(ALPHAS), 64, 3, baseline=False)["forward_passes"]
                              for l in layers_json)
    assert fwd["causal_gain"] == N_LAYERS * 3 * math.ceil(6 / 64)
    assert fwd["total"] == sum(v for k, v in fwd.items() if k != "total")
    assert all(_finite(v) and v >= 0 for v in summary["runtime_seconds"].values())

    # Provenance: the cache's hash and model, the SAEs' files.
    prov = summary["provenance"]
    assert prov["cache"]["config_hash"] == cache.manifest["config_hash"]
    assert prov["model"]["fingerprint"] == prov["cache"]["model"]["fingerprint"]
    for site, sae in prov["saes"].items():
        assert sae["sha256"] == file_sha256(Path(sae["path"]) / "sae.safetensors")
        assert Path(sae["path"]).name == site

    # Token sets reload with their ids; the sizes are the summary's.
    sets = LanguageTokenSets.from_json(loc / "token_sets.json")
    assert sets.sizes == summary["token_sets"]["sizes"] and min(sets.sizes.values()) > 0

    # Plots: every one promised, non-empty PNGs.
    plots = summary["files"]["plots"]
    assert {"spectra", "eigengap_reff", "window_scores", "top_features"} <= set(plots)
    assert sum(k.startswith("selectivity_vs_lift/") for k in plots) == N_LAYERS
    for path in plots.values():
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000

    # directions.safetensors: the documented keys; decoder rows are the SAE's.
    with safe_open(out / "directions.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "foxp2-localise-directions" and meta["target"] == "es"
    assert json.loads(meta["window"]) == window and tensors["window"].tolist() == window
    assert tensors["layers"].tolist() == list(range(N_LAYERS))
    for l in range(N_LAYERS):
        p, row = f"layers.{l}.", summary["layers"][str(l)]
        assert {k[len(p):] for k in tensors if k.startswith(p)} == DIRECTION_KEYS
        k = row["k"]
        ids = tensors[p + "feature_ids"]
        assert ids.tolist() == row["selected"]
        assert tensors[p + "decoder"].shape == tensors[p + "encoder"].shape == (k, D_MODEL)
        sae = load_sae(prov["saes"][f"layers.{l}.resid"]["path"])
        torch.testing.assert_close(tensors[p + "decoder"], sae.W_dec.detach()[ids])
        assert tensors[p + "mu_target"].shape == tensors[p + "mu_english"].shape == (N_LATENTS,)
        assert tensors[p + "neuron_mu_target"].shape == (N_NEURONS,)
        assert tensors[p + "typical_norm"].item() == pytest.approx(row["typical_norm"])
        support, basis = tensors[p + "support"], tensors[p + "basis"]
        assert basis.shape == (support.numel(), row["rank"])
        torch.testing.assert_close(basis.T @ basis, torch.eye(row["rank"]), atol=1e-4, rtol=0)
        assert ids.tolist() == support[:k].tolist()  # the support starts with the selection
        if k:
            assert tensors[p + "mean_direction"].norm().item() == pytest.approx(1, abs=1e-5)
        assert tensors[p + "target_neurons"].numel() == row["n_target_neurons"]
        en_ids = tensors[p + "english_feature_ids"]
        assert 1 <= en_ids.numel() <= 16 and not set(en_ids.tolist()) & set(ids.tolist())
        assert tensors[p + "english_encoder"].shape == tensors[p + "english_decoder"].shape \
            == (en_ids.numel(), D_MODEL)
        assert tensors[p + "support_decoder"].shape == (support.numel(), D_MODEL)
        for t in tensors.values():
            assert torch.isfinite(t.float()).all()


def test_resumed_run_reuses_lift_and_model_neurons_match_the_cache(pipeline, load_tiny):
    """Resume skips every lift / causal-gain forward; neurons taken from the model (hooks on
    the pair documents) equal the cache's, so tracing finds the same N_t / N_en."""
    from omegaconf import OmegaConf

    from steering.localise.config import LocaliseAppConfig
    from steering.localise.run import paired_mlp_activations_from_model, run_localise
    from steering.localise.selectivity import paired_codes_from_cache, paired_documents

    model, tokenizer, info = load_tiny("llama")
    cache = ActivationCache(pipeline["cache"])
    _, tgt, en = paired_documents(cache, "es", "en", ["discovery"])
    text = {d["doc_id"]: d["text"] for d in cache.documents}
    for reduction in ("mean", "last"):
        acts = paired_mlp_activations_from_model(
            model, tokenizer, [text[i] for i in tgt[:40]], [text[i] for i in en[:40]], [1, 3],
            reduction, batch_size=7)
        for layer in (1, 3):
            ref = paired_codes_from_cache(cache, f"layers.{layer}.mlp", "es", "en",
                                          reduction=reduction)
            torch.testing.assert_close(acts[layer][0], ref.target[:40], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts[layer][1], ref.english[:40], atol=1e-4, rtol=1e-4)

    out = pipeline["root"] / "resumed"
    shutil.copytree(pipeline["out"] / "localise" / "work", out / "localise" / "work")
    overrides = [o for o in LOCALISE if not o.startswith(("model=", "progress"))]
    cfg = OmegaConf.merge(OmegaConf.structured(LocaliseAppConfig), OmegaConf.from_dotlist(
        [*overrides, f"cache_dir={pipeline['cache']}", f"sae_dir={pipeline['saes']}",
         f"out_dir={out}", "resume=true", "tracing.source=model", "progress=false",
         "plots=false"]))
    summary = run_localise(cfg, model_bundle=(model, tokenizer, info))
    first = json.loads((pipeline["out"] / "localise" / "summary.json").read_text())
    assert summary["forward_passes"]["lift"] == 0 and summary["forward_passes"]["causal_gain"] == 0
    assert summary["forward_passes"]["tracing_activations"] > 0
    assert summary["tracing_source"] == "model" and summary["lape"]["source"] == "model"
    assert summary["window"]["layers"] == first["window"]["layers"]
    for l, row in first["layers"].items():
        again = summary["layers"][l]
        assert again["selected"] == row["selected"] and again["causal_gain"] == row["causal_gain"]
        assert again["mass_stab"] == pytest.approx(row["mass_stab"])
    traced = json.loads((out / "localise" / "layers.json").read_text())
    cached = json.loads((pipeline["out"] / "localise" / "layers.json").read_text())
    for l in traced:
        if cached[l]["trace"] is not None:
            assert traced[l]["trace"]["target_neurons"] == cached[l]["trace"]["target_neurons"]
            assert traced[l]["trace"]["english_neurons"] == cached[l]["trace"]["english_neurons"]


def test_lape_can_be_skipped_and_added_later_without_changing_the_steers_inputs(pipeline,
                                                                                 load_tiny):
    """tracing.lape=false (compare=fast) writes no LAPE sets; the same run resumed with
    LAPE adds them and nothing else: the steers' content digest is unchanged, the lape
    baseline's is not."""
    from omegaconf import OmegaConf

    from steering.localise.config import LocaliseAppConfig
    from steering.localise.run import run_localise
    from steering.steer.localisation import Localisation

    model, tokenizer, info = load_tiny("llama")
    out = pipeline["root"] / "lape-later"
    shutil.copytree(pipeline["out"] / "localise" / "work", out / "localise" / "work")
    overrides = [o for o in LOCALISE if not o.startswith(("model=", "progress"))]

    def localise(lape: bool) -> dict:
        cfg = OmegaConf.merge(OmegaConf.structured(LocaliseAppConfig), OmegaConf.from_dotlist(
            [*overrides, f"cache_dir={pipeline['cache']}", f"sae_dir={pipeline['saes']}",
             f"out_dir={out}", "resume=true", "progress=false", "plots=false",
             f"tracing.lape={str(lape).lower()}"]))
        return run_localise(cfg, model_bundle=(model, tokenizer, info))

    skipped = localise(False)
    assert skipped["lape"] == {"skipped": True} and "lape" not in skipped["runtime_seconds"]
    assert all(row["lape_overlap"] is None for row in skipped["layers"].values())
    without = Localisation(out)
    assert all("lape" not in rec for rec in without.records.values())
    with_lape = localise(True)
    assert with_lape["forward_passes"]["lift"] == 0 and with_lape["lape"]["target"]["n_lape"] >= 0
    again = Localisation(out)
    assert all("lape" in rec for rec in again.records.values())
    assert again.content_digest() == without.content_digest()
    assert again.content_digest(lape=True) != without.content_digest(lape=True)


def _localise_in_process(monkeypatch, args: list[str]) -> None:
    from steering.apps import localise_app

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["foxp2-localise", *args])
    localise_app.main()


def test_bad_input_is_refused_at_start_with_a_message(pipeline, tmp_path, monkeypatch):
    from steering.localise.config import LocaliseConfigError
    from steering.localise.run import LocaliseError

    base = [*LOCALISE, f"paths.root={tmp_path}", f"cache_dir={pipeline['cache']}",
            f"out_dir={tmp_path / 'out'}"]
    with pytest.raises(LocaliseError, match=r"language\(s\) \['fr'\] are not in the cache.*"
                                            r"it has \['en', 'es', 'hi'\]"):
        _localise_in_process(monkeypatch, [*base, f"sae_dir={pipeline['saes']}", "target=fr"])

    partial = tmp_path / "saes"
    for l in range(3):
        shutil.copytree(pipeline["saes"] / f"layers.{l}.resid", partial / f"layers.{l}.resid")
    with pytest.raises(LocaliseError, match=r"has no SAE for site\(s\) layers\.3\.resid.*"
                                            r"it has layers\.0\.resid, layers\.1\.resid"):
        _localise_in_process(monkeypatch, [*base, f"sae_dir={partial}", "layers=[0,1,2,3]"])
    with pytest.raises(LocaliseError, match=r"layer\(s\) \[7\] have no cached resid site.*"
                                            r"it has layers\.0\.resid"):
        _localise_in_process(monkeypatch, [*base, f"sae_dir={partial}", "layers=[1,7]"])

    with pytest.raises(ConfigCompositionException, match="top_n"):
        _localise_in_process(monkeypatch, [*base, "lift.top_n=3"])
    with pytest.raises(LocaliseConfigError, match=r"window\.min_width=0"):
        _localise_in_process(monkeypatch, [*base, f"sae_dir={partial}", "window.min_width=0"])
    assert not (tmp_path / "out" / "localise" / "summary.json").exists()
