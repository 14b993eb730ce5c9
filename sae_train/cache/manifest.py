"""The cache manifest: what was cached, with which config, and which shards are finished."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

# Per-token metadata, one record per stored token (the same rows in every site's shards).
META_DTYPE = np.dtype([
    ("token_id", "<i4"), ("doc_id", "<i4"), ("position", "<i4"),
    ("language", "<u1"), ("split", "<u1"),
])


class CacheError(RuntimeError):
    """A cache that cannot be used as asked: other config, missing or corrupt shard."""


@functools.cache
def _file_mode() -> int:
    """0666 minus the process umask: what ``open()`` would give (mkstemp's 0600 would hide the
    cache from the other users of a shared cluster filesystem)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_temp_name(name: str) -> bool:
    """``.<file>.<random>``: a temp file of :func:`atomic_write_bytes` left by a killed run."""
    return name.startswith(".") and name.count(".") >= 2 and not name.startswith(".lock")


def atomic_write_bytes(path: Path, *chunks: bytes | memoryview) -> None:
    """Write via a temp file in the same folder + fsync + rename, so readers (and a resumed
    run) never see half a file. The file gets the mode ``open()`` would give it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Save ``array`` as .npy atomically; return the sha256 of the file's bytes.

    The header and the data are streamed straight into the temp file (no in-memory copy of
    the whole file) and hashed on the way.
    """
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.sha256(header.getvalue())
    data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    digest.update(data)
    atomic_write_bytes(path, header.getvalue(), data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: config diffs name the exact keys."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def diff_configs(old: dict, new: dict) -> list[str]:
    """Lines ``key: old → new`` for every differing flattened key."""
    a, b = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} → {b.get(key, '<absent>')!r}")
    return lines


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not a readable cache manifest (invalid JSON: {err}); "
                         "re-create the cache") from err
    missing = [k for k in ("config_hash", "sites", "shards", "n_tokens") if k not in manifest] \
        if isinstance(manifest, dict) else ["(not a JSON object)"]
    if missing:
        raise CacheError(f"{path} is not a cache manifest written by sae-cache: it lacks "
                         f"{', '.join(missing)}")
    return manifest
