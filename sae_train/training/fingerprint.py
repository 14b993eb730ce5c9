"""Refuse to resume a checkpoint written under settings that shape the weights differently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_train.training.module import FINGERPRINT_KEY


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this run (other SAE config, sites, cache)."""


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with a clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or unsafe pickles
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointMismatchError(f"checkpoint {path} is not a readable Lightning "
                                      f"checkpoint ({first})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointMismatchError(f"checkpoint {path} is not a Lightning checkpoint "
                                      "(no state_dict)")
    return checkpoint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved → current`` for every differing key."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} → {b!r}")
    return lines


def check_resume(path: str | Path, current: dict[str, Any]) -> None:
    """Raise CheckpointMismatchError unless the checkpoint at ``path`` was written with the
    same weight fingerprint as ``current`` (naming every differing field)."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get(FINGERPRINT_KEY)
    if saved is None:
        raise CheckpointMismatchError(
            f"checkpoint {path} has no config fingerprint (written by an older version or "
            "another program); start afresh with checkpoint.resume=null or another out_dir")
    differences = fingerprint_differences(saved, current)
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written under another config; differing: "
            + "; ".join(differences) + ". Resume with the same settings, or start afresh "
            "(checkpoint.resume=null or another out_dir)")
