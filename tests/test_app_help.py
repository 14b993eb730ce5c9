"""`--help` of every app lists its config groups and keys with defaults and descriptions."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sae_train.training.config import LoaderConfig, TrainAppConfig
from sae_train.apps.help import field_help, first_sentence

# app → lines its --help must contain (a group with its options, keys with default and
# description, each as the dataclass comment says it).
EXPECTED = {
    "sae-cache": [
        "  model           gemma2_9b, *gemma3_270m,",
        "  data            *embedded, flores_plus,",
        "  cache.dtype=bfloat16  (str)",
        "      Storage dtype of the activations: bfloat16, float16 or float32.",
        "  cache.shard_tokens=16384  (int)",
        "      Tokens per shard file (the unit of atomic writes and of resume).",
    ],
    "sae-train": [
        "  sae             batchtopk, jumprelu, relu, *topk",
        "  trainer         cpu, ddp, *default, gpu, multinode",
        "  logger          csv, *wandb",
        "  sae.k=32  (int)",
        "      Active latents per token.",
        "  loader.batch_size=4096  (int)",
        "      Tokens per batch on each rank (the global batch is batch_size × world size).",
        "  max_tokens=null  (int | None)",
    ],
    "foxp2-localise": [
        "  model           gemma2_9b, *gemma3_270m,",
        "  target=es  (str)",
        "  lift.top_m=16  (int)",
        "      Screening size M: the top-M latents by Sel (Sel > 0) are verified by lift.",
    ],
    "foxp2-steer": [
        "  primary=foxp2  (str)",
        "      The method the bars and the CLI's default artifact refer to.",
        "  tuning.kl_budget=0.5  (float)",
    ],
    "foxp2-generate": [
        "  artifact=???  (required)  (str)",
        "      A steering artifact folder (foxp2-steer writes <out_dir>/artifacts/<method>/).",
        "  repetition_penalty=1.0  (float)",
    ],
    "foxp2-demo": [
        "  targets=[es,hi]  (list[str])",
        "  force=[]  (list[str])",
        "      Stages to recompute even when their outputs exist.",
    ],
}


def test_field_help_comes_from_the_dataclass_comments():
    assert field_help(LoaderConfig, "prefetch") == "Batches read ahead on a background thread."
    assert field_help(TrainAppConfig, "out_dir") == \
        "Run directory: checkpoints, logs and (by default) the exported SAEs."
    assert first_sentence("Rows, e.g. 4. Then more.") == "Rows, e.g. 4."
    assert first_sentence("Weight 1.5 of it") == "Weight 1.5 of it"


@pytest.mark.slow
def test_every_app_help_lists_groups_and_keys(repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    bin_dir = Path(sys.executable).parent
    runs = {app: [app, "--help"] for app in EXPECTED}
    runs["sae-train sae=relu"] = ["sae-train", "sae=relu", "--help"]
    # All at once: each --help mostly waits on imports.
    procs = {name: subprocess.Popen([str(bin_dir / cmd[0]), *cmd[1:]], env=env, cwd=repo_root,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in runs.items()}
    outputs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help failed:\n{out[-3000:]}"
        outputs[name] = out
    for app, expected in EXPECTED.items():
        out = outputs[app]
        lines = out.splitlines()
        assert out.startswith(f"{app}: "), out[:200]
        assert f"Usage: {app} [key=value ...]" in out
        assert "== Config groups" in out and "== Keys" in out
        missing = [e for e in expected if not any(line.startswith(e) for line in lines)]
        assert not missing, f"{app} --help lacks {missing}:\n{out}"
    # The help follows the group choices given before --help: ReLU's keys, not TopK's.
    relu = outputs["sae-train sae=relu"].splitlines()
    assert "  sae.tied=false  (bool)" in relu
    assert not any(line.startswith("  sae.k=") for line in relu)
    assert "  sae             batchtopk, jumprelu, *relu, topk" in relu


def test_console_scripts_ask_for_huge_pages_unless_the_user_chose(repo_root):
    """sae_train.apps.entry sets THP_MEM_ALLOC_ENABLE=1 for torch's CPU allocator before the
    app imports torch, keeps a value the user set, and every console script goes through it."""
    from sae_train.apps import entry

    code = ("import os, sys; from sae_train.apps.entry import prepare_process; "
            "prepare_process(); print(os.environ.get('THP_MEM_ALLOC_ENABLE'), "
            "'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = str(repo_root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == (["1", "False"] if sys.platform.startswith("linux") else ["None", "False"])
    out = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False"]
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(EXPECTED)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == "sae_train.apps.entry" and callable(getattr(entry, func)), name
