"""Round trips with the real libraries: SAELens 6.x and sparsify read what we export and we read
what they write (their own writers, including SAELens' training saves), with the same codes and
reconstructions (1e-5) on random inputs. In CI (CI=true) a missing library is an error, not a
skip: the README's test command installs both (the `interop` extra)."""

from __future__ import annotations

import copy
import importlib
import json
import os
import warnings

import pytest
import torch

from sae_train.saes import SAEFormatError, build_sae, load_pretrained_sae, load_sae, save_sae

D_IN, N_LATENTS, K = 16, 64, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _library(name: str):
    """The real library; CI must have it (a skip there would hide a broken round trip)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _inputs(seed: int = 0, n: int = 32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _our_sae(kind: str, seed: int = 0):
    """One of our SAEs with random weights, a non-trivial input scale (folded at export) and
    calibrated thresholds, as after training."""
    torch.manual_seed(seed)
    config = {"kind": kind, "n_latents": N_LATENTS}
    if kind in ("topk", "batchtopk"):
        config["k"] = K
    sae = build_sae(config, D_IN)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.input_scale.fill_(0.37)
        if kind == "jumprelu":
            sae.threshold.uniform_(0.05, 0.6)
        if kind == "batchtopk":
            sae.calibrate_threshold(_inputs(seed=9, n=512))
    return sae.eval()


def _ours_encode_decode(sae, x):
    """Codes (raw units: the input scale folded, as exported) and reconstructions."""
    if float(sae.input_scale) != 1.0:
        sae = copy.deepcopy(sae)
        sae.fold_input_scale()
    with torch.no_grad():
        codes = sae.encode(x)
        return codes, sae.decode(codes)


# ---------------------------------------------------------------------- SAELens
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_loads_every_architecture_we_export(kind, tmp_path):
    sae_lens = _library("sae_lens")
    ours = _our_sae(kind)
    save_sae(ours, tmp_path, metadata={"site": "layers.1.resid"}, format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    expected_class = {"topk": "TopKSAE", "relu": "StandardSAE"}.get(kind, "JumpReLUSAE")
    assert type(theirs).__name__ == expected_class
    x = _inputs(1)
    codes, recon = _ours_encode_decode(ours, x)
    with torch.no_grad():
        their_codes = theirs.encode(x)
        their_recon = theirs.decode(their_codes)
    assert (codes != 0).sum() > 0
    torch.testing.assert_close(their_codes, codes, **TOL)
    torch.testing.assert_close(their_recon, recon, **TOL)
    # ... and our own reader gives the same SAE back from that folder.
    again = load_sae(tmp_path)
    torch.testing.assert_close(_ours_encode_decode(again, x)[1], recon, **TOL)
    assert again.metadata["site"] == "layers.1.resid"


def _randomise_saelens(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.startswith("b_") else 0.3))
        # Decoder rows of unequal norms: exercises rescale_acts_by_decoder_norm.
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=g) * 2 + 0.2)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.3 + 0.02)


def _saelens_models(sae_lens):
    """(name, their SAE, how they save it) for each layout their writers produce."""
    common = dict(d_in=D_IN, d_sae=N_LATENTS)
    yield "topk-inference", sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=K, **common)), "save_model"
    yield "topk-training (rescale_acts_by_decoder_norm)", sae_lens.TopKTrainingSAE(
        sae_lens.TopKTrainingSAEConfig(k=K, **common)), "save_model"
    yield "topk-training inference save", sae_lens.TopKTrainingSAE(
        sae_lens.TopKTrainingSAEConfig(k=K, **common)), "save_inference_model"
    yield "standard", sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common)), "save_model"
    yield "jumprelu", sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common)), "save_model"
    batchtopk = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=K, **common))
    batchtopk.topk_threshold.fill_(0.4)
    yield "batchtopk inference save (jumprelu)", batchtopk, "save_inference_model"


def test_we_load_what_saelens_writes(tmp_path):
    sae_lens = _library("sae_lens")
    x = _inputs(2)
    names = []
    for seed, (name, theirs, save) in enumerate(_saelens_models(sae_lens)):
        _randomise_saelens(theirs, seed)
        folder = tmp_path / str(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(theirs, save)(str(folder))
        cfg = json.loads((folder / "cfg.json").read_text())
        if name.startswith("topk-training (rescale"):
            assert cfg["rescale_acts_by_decoder_norm"] is True  # the case we fold on load
        reloaded = sae_lens.SAE.load_from_disk(str(folder))  # their inference view of it
        ours = load_sae(folder)
        with torch.no_grad():
            their_codes = reloaded.encode(x)
            their_recon = reloaded.decode(their_codes)
        codes, recon = _ours_encode_decode(ours, x)
        assert (codes != 0).sum() > 0, name
        torch.testing.assert_close(codes, their_codes, **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(recon, their_recon, **TOL, msg=lambda m: f"{name}: {m}")
        names.append(name)
    assert len(names) == 6


def test_saelens_batchtopk_training_save_loads_with_its_threshold(tmp_path):
    sae_lens = _library("sae_lens")
    theirs = sae_lens.BatchTopKTrainingSAE(
        sae_lens.BatchTopKTrainingSAEConfig(k=K, d_in=D_IN, d_sae=N_LATENTS))
    _randomise_saelens(theirs, 11)
    theirs.topk_threshold.fill_(0.4)
    theirs.save_model(str(tmp_path / "training"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    ours = load_sae(tmp_path / "training")
    assert ours.config.kind == "batchtopk"
    reference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"))
    x = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), reference.encode(x), **TOL)


# ---------------------------------------------------------------------- sparsify
def _sparsify_encode_decode(coder, x):
    with torch.no_grad():
        out = coder.encode(x)
        acts, indices = out[0], out[1]
        codes = torch.zeros(x.shape[0], coder.num_latents).scatter(1, indices, acts)
        return codes, coder.decode(acts, indices)


@pytest.mark.parametrize("format", ["native", "sparsify"])
def test_sparsify_loads_our_topk(format, tmp_path):
    sparsify = _library("sparsify")
    ours = _our_sae("topk")
    save_sae(ours, tmp_path, format=format)
    coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    x = _inputs(4)
    codes, recon = _ours_encode_decode(ours, x)
    their_codes, their_recon = _sparsify_encode_decode(coder, x)
    torch.testing.assert_close(their_codes, codes, **TOL)
    torch.testing.assert_close(their_recon, recon, **TOL)


def test_we_load_what_sparsify_writes(tmp_path):
    sparsify = _library("sparsify")
    torch.manual_seed(5)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N_LATENTS, k=K))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.3)
        coder.b_dec.normal_(0, 0.5)
        coder.W_dec.mul_(torch.rand(N_LATENTS, 1) + 0.5)
    coder.save_to_disk(tmp_path)
    ours = load_sae(tmp_path)
    x = _inputs(5)
    codes, recon = _ours_encode_decode(ours, x)
    their_codes, their_recon = _sparsify_encode_decode(coder, x)
    torch.testing.assert_close(codes, their_codes, **TOL)
    torch.testing.assert_close(recon, their_recon, **TOL)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "batchtopk"])
def test_sparsify_refuses_our_other_architectures(kind, tmp_path):
    """Before: sparsify read our ReLU export as a TopK SAE without complaint."""
    sparsify = _library("sparsify")
    save_sae(_our_sae(kind), tmp_path, format="native")
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == kind
    with pytest.raises(TypeError, match=f"got {kind}"):
        sparsify.SparseCoder.load_from_disk(tmp_path)
    with pytest.raises(SAEFormatError, match=f"sparsify has no '{kind}' SAE"):
        save_sae(_our_sae(kind), tmp_path / "s", format="sparsify")
    assert not (tmp_path / "s" / "cfg.json").exists()


# ---------------------------------------------------------------------- the Hub
def test_load_pretrained_fetches_only_the_requested_folder(tmp_path, monkeypatch):
    """Offline: a fake Hub snapshot holding folders the libraries themselves wrote (a SAELens
    release layout and a sparsify layout); only the asked-for folder's files are requested."""
    sae_lens, sparsify = _library("sae_lens"), _library("sparsify")
    repo = tmp_path / "snapshot"
    lens = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=K, d_in=D_IN, d_sae=N_LATENTS))
    _randomise_saelens(lens, 21)
    lens.save_model(str(repo / "blocks.8.hook_resid_pre"))
    sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N_LATENTS, k=K)) \
        .save_to_disk(repo / "layers.6")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(repo)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    a = load_pretrained_sae("someone/saelens-release", "blocks.8.hook_resid_pre")
    b = load_pretrained_sae("EleutherAI/sae-x", "layers.6", revision="v1")
    assert a.config.kind == b.config.kind == "topk" and a.n_latents == N_LATENTS
    assert calls == [
        ("someone/saelens-release", None, ["blocks.8.hook_resid_pre/cfg.json",
                                           "blocks.8.hook_resid_pre/*.safetensors"]),
        ("EleutherAI/sae-x", "v1", ["layers.6/cfg.json", "layers.6/*.safetensors"])]
    x = _inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x), lens.encode(x), **TOL)


def test_load_pretrained_offline_without_cache_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEFormatError, match="cannot fetch SAE 'nobody/no-such-sae'"):
        load_pretrained_sae("nobody/no-such-sae", "layers.0")
