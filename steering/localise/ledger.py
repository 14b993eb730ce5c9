"""Bookkeeping of a localisation run: its error type, the per-step ledger of seconds and model
forward passes, and JSON writing (atomic, NaN → null) and digests of what it writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


class LocaliseError(ValueError):
    """Inputs the localisation cannot run on (names the input, what is wrong, what to do)."""


@dataclass
class Ledger:
    """Seconds and model forward passes per step (summed over layers)."""

    seconds: dict[str, float] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)
    calls: list[int] = field(default_factory=lambda: [0])

    @contextmanager
    def step(self, name: str, record: dict | None = None):
        start, calls = time.perf_counter(), self.calls[0]
        try:
            yield
        finally:
            dt, n = time.perf_counter() - start, self.calls[0] - calls
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.forwards[name] = self.forwards.get(name, 0) + n
            if record is not None:
                record.setdefault("seconds", {})[name] = dt
                record.setdefault("forward_passes", {})[name] = n


@contextmanager
def count_forwards(model, counter: list[int]):
    """Count every call of ``model``'s forward (the top-level module) into ``counter[0]``."""
    def hook(_module, _args, _kwargs):
        counter[0] += 1
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def jsonable(obj: Any) -> Any:
    """Tensors, numpy values and dataclasses → JSON types; NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), ensure_ascii=False, indent=2) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]
