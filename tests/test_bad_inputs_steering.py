"""Bad inputs to `foxp2-localise`, `foxp2-steer`, `foxp2-generate` and the steering Python API:
each fails with a clear one-line error that names the bad thing (no traceback) and leaves
nothing half-written.

The apps run as subprocesses (their real entry points, as a user runs them) and fail at config
or input validation, before any large model is loaded: our checks print ``error: <message>`` and
exit 2 (``sae_train.apps.report_user_errors``); a misspelt key is Hydra's own short message and
exit 1. The table in docs/results.md ("Issue 16", "Steering side") lists the same cases.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steering.steer.artifact import ArtifactError, LayerEdit, SteeringArtifact
from steering.steer.fingerprint import model_fingerprint
from steering.steer.runtime import steer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _artifact(d: int = 64, **kw) -> SteeringArtifact:
    g = torch.Generator().manual_seed(0)
    edits = [LayerEdit(layer=l, space="resid", add=torch.randn(d, generator=g)) for l in (0, 1)]
    return SteeringArtifact(method="foxp2", target="es", edits=edits, **{"lam": 4.0, **kw})


def _files(root: Path) -> list[str]:
    """Every file under ``root`` outside Hydra's log folders."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "logs" not in p.relative_to(root).parts
                  and ".hydra" not in p.relative_to(root).parts)


def _one_line_error(text: str, *needles: str) -> None:
    assert "Traceback" not in text, text
    lines = [l for l in text.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------- the Python API
def test_load_missing_folder_and_a_file(tmp_path):
    with pytest.raises(ArtifactError, match="nothing is not a steering artifact: the folder is"):
        SteeringArtifact.load(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="it is a file, not a folder"):
        SteeringArtifact.load(tmp_path / "file")
    folder = _artifact().save(tmp_path / "a")
    (folder / "steer.json").unlink()
    with pytest.raises(ArtifactError, match="steer.json is missing"):
        SteeringArtifact.load(folder)


def test_load_truncated_tensors(tmp_path):
    folder = _artifact().save(tmp_path / "a")
    raw = (folder / "steer.safetensors").read_bytes()
    (folder / "steer.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ArtifactError, match=r"steer.safetensors does not match the checksum.*"
                                            "truncated"):
        SteeringArtifact.load(folder)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        SteeringArtifact.load(folder, verify=False)  # no checksum: the reader's error, one line


def test_load_edited_parameters_is_refused_and_named(tmp_path, caplog):
    folder = _artifact().save(tmp_path / "a")
    before = (folder / "steer.safetensors").read_bytes()
    meta = json.loads((folder / "steer.json").read_text())
    meta["lam"] = 4000.0
    (folder / "steer.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError) as err:
        SteeringArtifact.load(folder)
    message = str(err.value)
    assert "\n" not in message and "was edited after it was saved" in message
    assert "(lam: 4000.0)" in message and "allow_edited=True" in message
    assert SteeringArtifact.load(folder, allow_edited=True).lam == 4000.0
    assert "used anyway" in caplog.text
    assert (folder / "steer.safetensors").read_bytes() == before  # nothing rewritten
    meta["edits"][1]["layer"] = 5
    (folder / "steer.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"lam: 4000.0, edits: "):
        SteeringArtifact.load(folder)


@pytest.mark.parametrize("content, needle", [
    ('{"format": "sae", "lam": 1}', "format 'sae', expected 'foxp2-steer'"),
    ("[1, 2]", "format 'list'"),
    ("{not json", "is not valid JSON"),
    ('{"format": "foxp2-steer", "format_version": 99}', "format_version 99 is newer"),
])
def test_load_foreign_or_corrupt_json(content, needle, tmp_path):
    folder = _artifact().save(tmp_path / "a")
    (folder / "steer.json").write_text(content)
    with pytest.raises(ArtifactError, match="steer.json") as err:
        SteeringArtifact.load(folder)
    assert needle in str(err.value)


def test_load_with_a_field_missing(tmp_path):
    folder = _artifact().save(tmp_path / "a")
    meta = json.loads((folder / "steer.json").read_text())
    del meta["position"]
    (folder / "steer.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="'position' is missing"):
        SteeringArtifact.load(folder)


@pytest.mark.parametrize("bad", [dict(gamma=math.nan), dict(lam=math.inf), dict(beta=-1e9),
                                 dict(gamma="strong")])
def test_bad_strengths_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(ArtifactError, match=f"{name}="):
        _artifact(**bad)
    with pytest.raises(ArtifactError, match=f"{name}="):
        _artifact().with_strengths(**bad)


def test_bad_strength_in_a_saved_file(tmp_path):
    folder = _artifact().save(tmp_path / "a")
    text = (folder / "steer.json").read_text().replace('"gamma": 1.0', '"gamma": NaN')
    (folder / "steer.json").write_text(text)
    with pytest.raises(ArtifactError, match="gamma=nan: a strength must be finite"):
        SteeringArtifact.load(folder, allow_edited=True)


def test_steer_refuses_bad_gamma_and_position(load_tiny):
    model, _, _ = load_tiny("llama")
    art = _artifact(model.config.hidden_size)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks)  # noqa: E731
                        for m in model.modules())
    before = hooks()
    with pytest.raises(ArtifactError, match="gamma=inf"):
        with steer(model, art, gamma=math.inf):
            pass
    with pytest.raises(ArtifactError, match="position='middle'"):
        with steer(model, art, position="middle"):
            pass
    with pytest.raises(ArtifactError, match="decode_steps=-1"):
        with steer(model, art, decode_steps=-1):
            pass
    assert hooks() == before  # refused before a hook was installed


def test_fingerprint_is_saved_and_a_mismatched_model_refused(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("llama")
    art = _artifact(model.config.hidden_size)
    folder = art.save(tmp_path / "a", model=model, tokenizer=tokenizer)
    meta = json.loads((folder / "steer.json").read_text())
    fp = meta["model_fingerprint"]
    assert fp == model_fingerprint(model, tokenizer)
    assert fp["model_type"] == "llama" and fp["n_layers"] == model.config.num_hidden_layers
    assert {"hidden_size", "mlp_width", "vocab_size", "tokenizer"} <= set(fp)
    assert len(meta["parameters_sha256"]) == 64
    loaded = SteeringArtifact.load(folder)
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad(), steer(model, loaded, tokenizer=tokenizer):  # the same model: fine
        model(ids)
    other = loaded.with_strengths(model_fingerprint={**fp, "hidden_size": 999, "n_layers": 40})
    with pytest.raises(ArtifactError) as err:
        with steer(model, other):
            pass
    message = str(err.value)
    assert "built for another model" in message and "check_model=False" in message
    assert "hidden_size: artifact 999, model 64" in message and "n_layers: artifact 40" in message
    with torch.no_grad(), steer(model, other, check_model=False):  # the explicit override
        model(ids)
    foreign_vocab = loaded.with_strengths(model_fingerprint={**fp, "tokenizer": "0" * 16})
    with pytest.raises(ArtifactError, match="tokenizer: artifact '0000"):
        with steer(model, foreign_vocab, tokenizer=tokenizer):
            pass


def test_old_artifacts_have_no_fingerprint_and_still_steer(load_tiny):
    model, _, _ = load_tiny("llama")
    art = SteeringArtifact.load(ROOT / "tests" / "data" / "steer_artifacts_v1" / "foxp2")
    assert art.model_fingerprint == {}
    with steer(model, art):
        pass


# ---------------------------------------------------------------------- the apps
def _app(app: str, args: list[str], root: Path, env: dict | None = None) -> tuple[int, str]:
    """Run ``python -m steering.apps.<app>`` with ``args`` under ``root``; (status, output)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", f"steering.apps.{app}", f"paths.root={root}",
                           *args], cwd=root, env=full_env, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr + proc.stdout


@pytest.fixture
def saved(tmp_path) -> Path:
    return _artifact().save(tmp_path / "art")


GENERATE_CASES = {
    "missing_artifact": (["artifact={tmp}/nothing"], "nothing is not a steering artifact"),
    "gamma_nan": (["artifact={art}", "gamma=nan"], "gamma=nan: a strength must be finite"),
    "gamma_absurd": (["artifact={art}", "gamma=1e12"], "gamma=1000000000000.0: |gamma| > 1e+06"),
    "bad_position": (["artifact={art}", "position=middle"], "position='middle'"),
    "no_tokens": (["artifact={art}", "max_new_tokens=0"], "max_new_tokens=0: must be ≥ 1"),
    "missing_prompts_file": (["artifact={art}", "prompts_file={tmp}/p.txt"],
                             "prompts_file={tmp}/p.txt: no such file"),
    "edited_artifact": (["artifact={edited}"], "(lam: 4000.0); pass allow_edited=True"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_foxp2_generate_bad_input(case, saved, tmp_path):
    args, needle = GENERATE_CASES[case]
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("steer.json", "steer.safetensors"):
        (edited / name).write_bytes((saved / name).read_bytes())
    (edited / "steer.json").write_text((edited / "steer.json").read_text().replace(
        '"lam": 4.0', '"lam": 4000.0'))
    run = tmp_path / "run"
    run.mkdir()
    fill = dict(tmp=tmp_path, art=saved, edited=edited)
    code, out = _app("generate_app", [a.format(**fill) for a in args], run)
    assert code == 2, out
    _one_line_error(out, needle.format(**fill))
    assert _files(run) == []


def test_foxp2_generate_artifact_of_another_model(tmp_path, load_tiny, foxp2_cache_root):
    load_tiny("llama")  # materialised in the session cache: the app loads it from there
    art = _artifact()
    art.model_fingerprint = {"model_type": "gemma3_text", "n_layers": 18, "hidden_size": 640}
    folder = art.save(tmp_path / "art")
    code, out = _app("generate_app", [f"artifact={folder}", "model=tiny_llama",
                                      f"model.cache_dir={foxp2_cache_root}",
                                      f"out_file={tmp_path}/out.jsonl"], tmp_path,
                     env={"FOXP2_CACHE": str(foxp2_cache_root)})
    assert code == 2, out
    _one_line_error(out, "built for another model", "model_type: artifact 'gemma3_text', model "
                    "'llama'", "hidden_size: artifact 640, model 64", "check_model=false")
    assert not (tmp_path / "out.jsonl").exists()


def test_foxp2_generate_misspelt_key(saved, tmp_path):
    code, out = _app("generate_app", [f"artifact={saved}", "gama=2"], tmp_path)
    assert code == 1 and "Traceback" not in out and "gama" in out, out


LOCALISE_CASES = {
    "missing_cache": (["target=es", "cache_dir={tmp}/nocache", "sae_dir={tmp}/nosae"],
                      "no activation cache at {tmp}/nocache"),
    "bad_top_m": (["target=es", "lift.top_m=-1"], "lift.top_m"),
}
STEER_CASES = {
    "missing_localisation": (["target=es", "localise_dir={tmp}/noloc"],
                             "{tmp}/noloc is not a finished localisation"),
    "bad_kl_budget": (["target=es", "localise_dir={tmp}/noloc", "tuning.kl_budget=nan"],
                      "tuning.kl_budget=nan"),
    "infinite_lam": (["target=es", "localise_dir={tmp}/noloc", "tuning.lams=[1.0,inf]"],
                     "tuning.lams holds [inf]"),
}


@pytest.mark.parametrize("app, case", [("localise_app", c) for c in sorted(LOCALISE_CASES)]
                         + [("steer_app", c) for c in sorted(STEER_CASES)])
def test_localise_and_steer_bad_input(app, case, tmp_path):
    args, needle = (LOCALISE_CASES if app == "localise_app" else STEER_CASES)[case]
    code, out = _app(app, [a.format(tmp=tmp_path) for a in args], tmp_path)
    assert code == 2, out
    _one_line_error(out, needle.format(tmp=tmp_path))
    assert _files(tmp_path) == []
