"""Bad inputs to `sae-cache`, `sae-train` and the sae_train Python API: each one fails with a
clear one-line error that names the bad thing (no traceback) and leaves nothing half-written.

The apps run in-process through their real Hydra entry points. Our own checks print
``error: <message>`` and exit 2; Hydra's config-composition errors (a misspelt key, a value of
the wrong type, an unknown group option) are Hydra's own short message and exit 1. The table in
docs/results.md ("Issue 16: bad inputs") lists the same cases.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_sae_support import FAST, one_torch_thread, tiny_cache  # noqa: F401

SITE = "layers.1.resid"


# ---------------------------------------------------------------------- running the apps
def _run(monkeypatch, capsys, module: str, args: list[str]) -> tuple[int, str]:
    """Run ``module.main()`` with ``args``; returns (exit status, stderr + stdout)."""
    import importlib

    app = importlib.import_module(f"sae_train.apps.{module}")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", [module, *args])
    capsys.readouterr()
    try:
        app.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        _drop_stream_handlers()
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _drop_stream_handlers() -> None:
    """Hydra points its log handlers at this test's captured streams; drop them so a later test
    does not log into a closed stream."""
    import logging

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in
                                          list(logging.root.manager.loggerDict))]:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler):
                logger.removeHandler(handler)


def _assert_clear_error(code: int, output: str, *names: str) -> str:
    assert code != 0, f"expected a failure, got exit 0:\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    if lines:  # our own check: exactly one line
        assert len(lines) == 1 and code == 2, output
        message = lines[0]
    else:  # Hydra's composition error (no traceback without HYDRA_FULL_ERROR)
        message = output
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return message


def _no_leftovers(directory: Path) -> None:
    """No temp files of atomic writes and no unfinished cache under ``directory``."""
    if not directory.exists():
        return
    temps = [p for p in directory.rglob(".*") if p.is_file() and p.name != ".lock"]
    assert not temps, temps
    manifest = directory / "manifest.json"
    if manifest.exists():
        assert json.loads(manifest.read_text()).get("complete"), "half-written cache left"


# ---------------------------------------------------------------------- sae-cache
@pytest.fixture()
def cache_args(tmp_path, foxp2_cache_root, load_tiny):
    load_tiny("llama")  # materialised once per session; the app loads it from FOXP2_CACHE
    out = tmp_path / "cache"
    return out, ["model=tiny_llama", f"cache.dir={out}", f"paths.root={tmp_path}",
                 f"hydra.run.dir={tmp_path}/h", "progress=false", "sites=layers.0.resid",
                 "cache.max_tokens=200", "cache.shard_tokens=100"]


CACHE_CASES = {
    # id: (overrides, names that the message must contain)
    "max_tokens=0": (["cache.max_tokens=0"], ["cache.max_tokens=0"]),
    "max_tokens=-5": (["cache.max_tokens=-5"], ["cache.max_tokens=-5"]),
    "shard_tokens=0": (["cache.shard_tokens=0"], ["cache.shard_tokens=0"]),
    "batch_size=-1": (["cache.batch_size=-1"], ["cache.batch_size=-1"]),
    "max_length=1": (["cache.max_length=1"], ["cache.max_length=1"]),
    "dtype=float8": (["cache.dtype=float8"], ["cache.dtype='float8'"]),
    "batch_size=many (type)": (["cache.batch_size=many"], ["batch_size"]),
    "misspelt key": (["cache.shard_tokenz=5"], ["shard_tokenz"]),
    "layer out of range": (["sites=layers.9.resid"], ["layers.9.resid", "4 layers"]),
    "unknown site kind": (["sites=layers.0.nothing"], ["layers.0.nothing"]),
    "unknown data.kind": (["data.kind=novel"], ["data.kind='novel'"]),
    "model dtype": (["model.dtype=float8"], ["float8"]),
    "model path missing": (["model.name=/nonexistent/model"], ["/nonexistent/model"]),
    "empty cache.dir": (["cache.dir= "], ["cache.dir"]),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_sae_cache_bad_option(case, cache_args, monkeypatch, capsys):
    out, base = cache_args
    overrides, names = CACHE_CASES[case]
    code, output = _run(monkeypatch, capsys, "cache_app", [*base, *overrides])
    _assert_clear_error(code, output, *names)
    assert not (out / "manifest.json").exists()
    _no_leftovers(out)


def test_sae_cache_dir_is_a_file(cache_args, monkeypatch, capsys):
    out, base = cache_args
    out.write_text("not a cache")
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    _assert_clear_error(code, output, str(out), "is a file")
    assert out.read_text() == "not a cache"


def test_sae_cache_dir_below_a_file(cache_args, monkeypatch, capsys, tmp_path):
    out, base = cache_args
    (tmp_path / "plain").write_text("x")
    code, output = _run(monkeypatch, capsys, "cache_app",
                        [*base, f"cache.dir={tmp_path}/plain/cache"])
    _assert_clear_error(code, output, f"{tmp_path}/plain/cache")


def test_sae_cache_corrupt_manifest(cache_args, monkeypatch, capsys):
    out, base = cache_args
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    _assert_clear_error(code, output, "manifest.json", "invalid JSON")
    assert (out / "manifest.json").read_text() == "{not json"


def test_sae_cache_foreign_manifest(cache_args, monkeypatch, capsys):
    out, base = cache_args
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"hello": 1}))
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    _assert_clear_error(code, output, "manifest.json", "config_hash")


def test_sae_cache_other_config_in_same_dir(cache_args, monkeypatch, capsys):
    out, base = cache_args
    assert _run(monkeypatch, capsys, "cache_app", base)[0] == 0
    before = (out / "manifest.json").read_bytes()
    code, output = _run(monkeypatch, capsys, "cache_app", [*base, "cache.max_tokens=300"])
    _assert_clear_error(code, output, "cache.max_tokens: 200 → 300", str(out))
    assert (out / "manifest.json").read_bytes() == before


def test_sae_cache_concurrent_writer_is_refused(cache_args, monkeypatch, capsys):
    """Before: two runs on one directory both 'succeeded', the last writer winning."""
    out, base = cache_args
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}
    (out / ".lock").write_text(json.dumps(holder))
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    _assert_clear_error(code, output, "being written by another sae-cache run",
                        f"pid {os.getppid()}", str(out / ".lock"))
    assert not (out / "manifest.json").exists()
    assert json.loads((out / ".lock").read_text()) == holder  # the other run's lock is kept


def test_sae_cache_stale_lock_is_taken_over(cache_args, monkeypatch, capsys):
    out, base = cache_args
    out.mkdir()
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    (out / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    assert code == 0, output
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert not (out / ".lock").exists()


def test_sae_cache_files_are_readable_by_others(cache_args, monkeypatch, capsys):
    """Before: mkstemp's 0600 hid cache files from other users of a shared filesystem."""
    out, base = cache_args
    old = os.umask(0o022)
    try:
        assert _run(monkeypatch, capsys, "cache_app", base)[0] == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777
             for p in out.rglob("*") if p.is_file()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_sae_cache_resume_removes_what_a_kill_left(cache_args, monkeypatch, capsys, tmp_path):
    """Before: temp files of a SIGKILLed run stayed in the cache forever. Here a kill landed
    after shard 1's files were renamed into place but before the manifest listed them."""
    out, base = cache_args
    assert _run(monkeypatch, capsys, "cache_app", base)[0] == 0
    reference = {p.relative_to(out).as_posix(): p.read_bytes()
                 for p in out.rglob("*") if p.is_file()}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["n_tokens"], manifest["complete"] = manifest["shards"][0]["n_tokens"], False
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    strays = [out / "layers.0.resid" / ".00001.npy.k3j2x9", out / "meta" / ".00002.npy.a8b7c6",
              out / ".manifest.json.q1w2e3"]
    for stray in strays:
        stray.write_bytes(b"half a file")
    code, output = _run(monkeypatch, capsys, "cache_app", base)
    assert code == 0, output
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == reference  # byte-identical, no stray or lock file


# ---------------------------------------------------------------------- sae-train
@pytest.fixture()
def train_args(tiny_cache, tmp_path):
    out = tmp_path / "run"
    return out, [*FAST, f"cache_dir={tiny_cache}", f"sites={SITE}", f"out_dir={out}",
                 f"hydra.run.dir={tmp_path}/h", "logger=csv", "sae.k=16"]


TRAIN_CASES = {
    "max_tokens=0": (["max_tokens=0"], ["max_tokens=0"]),
    "loader.batch_size=0": (["loader.batch_size=0"], ["loader.batch_size=0"]),
    "loader.prefetch=-1": (["loader.prefetch=-1"], ["loader.prefetch=-1"]),
    "optim.lr=-1": (["optim.lr=-1"], ["optim.lr=-1"]),
    "optim.decay_fraction=2": (["optim.decay_fraction=2"], ["optim.decay_fraction=2"]),
    "optim.betas one value": (["optim.betas=[0.9]"], ["optim.betas"]),
    "metrics.every_n_steps=0": (["metrics.every_n_steps=0"], ["metrics.every_n_steps=0"]),
    "checkpoint.every_n_steps=0": (["checkpoint.every_n_steps=0"],
                                   ["checkpoint.every_n_steps=0"]),
    "num_threads=0": (["num_threads=0"], ["num_threads=0"]),
    "sae.k=0": (["sae.k=0"], ["sae.k"]),
    "sae.k > n_latents": (["sae.k=1000"], ["sae.k=1000", "sae.n_latents=256"]),
    "sae.n_latents=-3": (["sae.n_latents=-3"], ["sae.n_latents"]),
    "unknown sae": (["sae=gated"], ["gated"]),
    "misspelt sae key": (["sae.kk=3"], ["kk"]),
    "max_tokens wrong type": (["max_tokens=lots"], ["max_tokens"]),
    "export.format=onnx": (["export.format=onnx"], ["export.format='onnx'"]),
    "export.dtype=int8": (["export.dtype=int8"], ["export.dtype='int8'"]),
    "sparsify export of relu": (["sae=relu", "export.format=sparsify"],
                                ["export.format=sparsify", "'relu'"]),
    "site not cached": (["sites=layers.7.resid"], ["layers.7.resid", "not in the cache"]),
    "pattern matches nothing": (["sites=layers.*.foo"], ["layers.*.foo"]),
    "unknown split": (["loader.train_splits=[nosuch]"], ["nosuch"]),
    "unknown language": (["loader.languages=[xx]"], ["xx"]),
    "no cache there": (["cache_dir=/nonexistent/cache"], ["/nonexistent/cache"]),
    "resume path missing": (["checkpoint.resume=/nonexistent/x.ckpt"], ["/nonexistent/x.ckpt"]),
    "too few tokens for one batch": (["loader.batch_size=100000"],
                                     ["no training step was run", "loader.batch_size=100000"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_sae_train_bad_option(case, train_args, monkeypatch, capsys):
    out, base = train_args
    overrides, names = TRAIN_CASES[case]
    if "sae=relu" in overrides:
        base = [a for a in base if a != "sae.k=16"]
    code, output = _run(monkeypatch, capsys, "train_app", [*base, *overrides])
    _assert_clear_error(code, output, *names)
    assert not (out / SITE).exists(), "an SAE was exported"


def _copy_cache(tiny_cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache-copy"
    shutil.copytree(tiny_cache, copy)
    return copy


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "missing", "manifest entry"])
def test_sae_train_refuses_a_damaged_shard(damage, tiny_cache, train_args, tmp_path,
                                           monkeypatch, capsys):
    """Before: a shard with flipped bytes trained silently."""
    out, base = train_args
    cache = _copy_cache(tiny_cache, tmp_path)
    shard = cache / SITE / "00002.npy"
    data = bytearray(shard.read_bytes())
    if damage == "flipped bytes":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:len(data) // 2]))
    elif damage == "missing":
        shard.unlink()
    else:  # the manifest's checksum of the shard is wrong
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["shards"][2]["files"][SITE]["sha256"] = "0" * 64
        (cache / "manifest.json").write_text(json.dumps(manifest))
    code, output = _run(monkeypatch, capsys, "train_app", [*base, f"cache_dir={cache}"])
    _assert_clear_error(code, output, f"{SITE}/00002.npy")
    assert not (out / SITE).exists()


def test_sae_train_incomplete_cache(tiny_cache, train_args, tmp_path, monkeypatch, capsys):
    out, base = train_args
    cache = _copy_cache(tiny_cache, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code, output = _run(monkeypatch, capsys, "train_app", [*base, f"cache_dir={cache}"])
    _assert_clear_error(code, output, "incomplete", str(cache))


def test_sae_train_resume_checkpoint_of_another_config(train_args, monkeypatch, capsys):
    """Before: a k=16 checkpoint was resumed and exported as a k=32 SAE."""
    out, base = train_args
    assert _run(monkeypatch, capsys, "train_app", [*base, "max_tokens=2048"])[0] == 0
    exported = (out / SITE / "sae.safetensors").read_bytes()
    code, output = _run(monkeypatch, capsys, "train_app",
                        [*base, "max_tokens=4096", "sae.k=32", "checkpoint.resume=auto"])
    _assert_clear_error(code, output, "sae.k: 16 → 32", "last.ckpt")
    assert (out / SITE / "sae.safetensors").read_bytes() == exported  # untouched


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04not a zip"])
def test_sae_train_resume_from_a_foreign_file(content, train_args, tmp_path, monkeypatch,
                                              capsys):
    out, base = train_args
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(content)
    code, output = _run(monkeypatch, capsys, "train_app",
                        [*base, f"checkpoint.resume={bogus}"])
    _assert_clear_error(code, output, str(bogus), "not a readable Lightning checkpoint")
    assert not (out / SITE).exists()


def test_sae_train_resume_after_finished_run_keeps_val_metrics(train_args, monkeypatch, capsys):
    """Before: resume=auto after a finished run exported val_metrics = {}."""
    out, base = train_args
    assert _run(monkeypatch, capsys, "train_app", [*base, "max_tokens=2048"])[0] == 0
    first = json.loads((out / SITE / "cfg.json").read_text())["metadata"]
    assert first["val_metrics"]["fvu"] > 0
    code, output = _run(monkeypatch, capsys, "train_app",
                        [*base, "max_tokens=2048", "checkpoint.resume=auto"])
    assert code == 0, output
    again = json.loads((out / SITE / "cfg.json").read_text())["metadata"]
    assert again["val_metrics"] == first["val_metrics"]
    assert again["training"]["global_step"] == first["training"]["global_step"]


# ---------------------------------------------------------------------- Python API
def _api_cases(tmp_path: Path):
    """(id, callable, exception type, names in the message)."""
    from safetensors.torch import save_file

    from sae_train.cache.manifest import CacheError
    from sae_train.cache.reader import ActivationCache
    from sae_train.saes import SAEConfigError, SAEFormatError, build_sae, load_sae, save_sae

    relu = build_sae({"kind": "relu", "n_latents": 8}, 4)
    save_sae(relu, tmp_path / "good")

    def truncated():
        folder = tmp_path / "trunc"
        shutil.copytree(tmp_path / "good", folder)
        data = (folder / "sae.safetensors").read_bytes()
        (folder / "sae.safetensors").write_bytes(data[:len(data) // 2])
        return load_sae(folder)

    def bad_json():
        folder = tmp_path / "badjson"
        shutil.copytree(tmp_path / "good", folder)
        (folder / "cfg.json").write_text("{")
        return load_sae(folder)

    def kind_vs_tensors():
        folder = tmp_path / "mismatch"
        shutil.copytree(tmp_path / "good", folder)
        tensors = {"encoder.weight": torch.zeros(8, 4), "encoder.bias": torch.zeros(8),
                   "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4),
                   "threshold": torch.zeros(8)}
        save_file(tensors, str(folder / "sae.safetensors"))
        return load_sae(folder)

    def kinds_disagree():
        folder = tmp_path / "disagree"
        shutil.copytree(tmp_path / "good", folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["architecture"] = "topk"
        (folder / "cfg.json").write_text(json.dumps(cfg))
        return load_sae(folder)

    def cache_without_keys():
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "manifest.json").write_text(json.dumps({"sites": []}))
        return ActivationCache(tmp_path / "c")

    return [
        ("load_sae: no such folder", lambda: load_sae(tmp_path / "nope"), SAEFormatError,
         ["nope", "does not exist"]),
        ("load_sae: truncated weights", truncated, SAEFormatError,
         ["sae.safetensors", "truncated or corrupt"]),
        ("load_sae: cfg.json not JSON", bad_json, SAEFormatError, ["cfg.json", "not valid JSON"]),
        ("load_sae: kind vs tensors", kind_vs_tensors, SAEFormatError,
         ["'relu'", "threshold"]),
        ("load_sae: kind fields disagree", kinds_disagree, SAEFormatError,
         ["architecture", "topk"]),
        ("save_sae: unknown format", lambda: save_sae(relu, tmp_path / "x", format="onnx"),
         SAEFormatError, ["'onnx'"]),
        ("save_sae: relu to sparsify", lambda: save_sae(relu, tmp_path / "y", format="sparsify"),
         SAEFormatError, ["sparsify has no 'relu' SAE"]),
        ("build_sae: unknown kind", lambda: build_sae({"kind": "nope"}, 4), SAEConfigError,
         ["'nope'"]),
        ("ActivationCache: foreign manifest", cache_without_keys, CacheError,
         ["manifest.json", "config_hash"]),
    ]


def test_python_api_bad_inputs(tmp_path):
    cases = _api_cases(tmp_path)
    for name, call, error, names in cases:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        for part in names:
            assert part in message, f"{name}: {part!r} not in {message!r}"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "cfg.json").exists()
    assert len(cases) == 9


@pytest.mark.parametrize("bad", [{"max_tokens": -5}, {"max_tokens": 0}, {"shard_tokens": 0},
                                 {"dtype": "int8"}, {"max_length": 1}])
def test_write_activation_cache_refuses_before_writing(bad, load_tiny, tmp_path):
    """Before: max_tokens=0 gave an empty cache marked complete; -5 a half-written dir."""
    from sae_train.cache.writer import write_activation_cache
    from sae_train.corpora.embedded import embedded_documents
    from sae_train.models.sites import resolve_sites

    model, tokenizer, _ = load_tiny("llama")
    docs = embedded_documents()[:8]
    with pytest.raises(ValueError, match=next(iter(bad))):
        write_activation_cache(model, tokenizer, docs, resolve_sites(model, ["layers.0.resid"]),
                               tmp_path / "c", progress=False, **bad)
    assert not (tmp_path / "c").exists()
