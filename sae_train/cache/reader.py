"""Read an activation cache: memory-mapped shards, metadata, verification."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from sae_train.cache.manifest import META_DTYPE, CacheError, file_sha256, read_manifest


class ActivationCache:
    """A finished (or partly written) cache directory, opened read-only.

    Token rows are addressed by a global index ``0 … n_tokens-1`` (shard order). Every site's
    shards hold the same rows as ``meta``; ``gather(site, idx)`` returns a ``(len(idx), width)``
    tensor in the cache's dtype.
    """

    def __init__(self, path: str | Path, verify: bool = False, require_complete: bool = True,
                 verify_reads: bool = False):
        """``verify`` checks every shard now; ``verify_reads`` checks each shard file the first
        time it is read (once per file and process: what training does before any of its rows
        reach the optimizer)."""
        self.path = Path(path)
        self.verify_reads = verify_reads
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"no activation cache at {self.path} (manifest.json missing); "
                             "create one with sae-cache")
        if require_complete and not manifest.get("complete"):
            raise CacheError(
                f"cache at {self.path} is incomplete ({manifest['n_tokens']}/"
                f"{manifest['total_tokens']} tokens); re-run sae-cache with the same config to "
                "finish it")
        self.manifest = manifest
        self.sites = {s["name"]: s for s in manifest["sites"]}
        self.dtype = manifest["dtype"]
        counts = [s["n_tokens"] for s in manifest["shards"]]
        self.shard_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_tokens = int(self.shard_offsets[-1])
        if verify:
            self.verify()

    # ------------------------------------------------------------------ structure
    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    @property
    def languages(self) -> list[str]:
        return self.manifest["languages"]

    @property
    def splits(self) -> list[str]:
        return self.manifest["splits"]

    def width(self, site: str) -> int:
        return int(self._site(site)["width"])

    def _site(self, site: str) -> dict:
        if site not in self.sites:
            raise CacheError(f"site {site!r} is not in the cache at {self.path}; it has "
                             f"{', '.join(self.sites)}")
        return self.sites[site]

    def _shard_path(self, name: str, shard: int) -> Path:
        return self.path / self.manifest["shards"][shard]["files"][name]["path"]

    def _memmaps(self, name: str) -> list[np.ndarray]:
        cache = self.__dict__.setdefault("_mm", {})
        if name not in cache:
            shards = range(len(self.manifest["shards"]))
            if self.verify_reads:
                for i in shards:
                    self._verify_file(self.manifest["shards"][i]["files"][name])
            try:
                cache[name] = [np.load(self._shard_path(name, i), mmap_mode="r") for i in shards]
            except FileNotFoundError as err:
                raise CacheError(f"cache at {self.path} is missing a shard: {err.filename}") from err
            except ValueError as err:  # a header numpy cannot parse
                raise CacheError(f"cache at {self.path} has an unreadable shard of {name!r}: "
                                 f"{err}; re-create the cache") from err
        return cache[name]

    # ------------------------------------------------------------------ data
    @cached_property
    def metadata(self) -> np.ndarray:
        """All per-token records (``META_DTYPE``), concatenated in global order."""
        parts = self._memmaps("meta")
        return np.concatenate(parts) if parts else np.zeros(0, META_DTYPE)

    @cached_property
    def documents(self) -> list[dict]:
        lines = (self.path / "documents.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]

    def select(self, splits: list[str] | None = None, languages: list[str] | None = None
               ) -> np.ndarray:
        """Global indices of the tokens in the given splits / languages (sorted)."""
        meta = self.metadata
        mask = np.ones(len(meta), dtype=bool)
        if splits is not None:
            unknown = sorted(set(splits) - set(self.splits))
            if unknown:
                raise CacheError(f"unknown splits {unknown}; the cache has {self.splits}")
            mask &= np.isin(meta["split"], [self.splits.index(s) for s in splits])
        if languages is not None:
            unknown = sorted(set(languages) - set(self.languages))
            if unknown:
                raise CacheError(f"languages {unknown} are not in the cache; it has "
                                 f"{self.languages}")
            mask &= np.isin(meta["language"], [self.languages.index(x) for x in languages])
        return np.flatnonzero(mask)

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def gather_numpy(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (sorted ascending for speed) of ``meta`` or a site, as numpy."""
        if name != "meta":
            self._site(name)
        maps = self._memmaps(name)
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.shard_offsets, indices, side="right") - 1
        first = maps[0] if maps else None
        out = np.empty((len(indices),) + first.shape[1:], dtype=first.dtype)
        # Rows are read shard by shard; sorted indices keep each read moving forward in the file.
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(indices)]):
            if start == stop:
                continue
            s = shard_of[start]
            local = indices[start:stop] - self.shard_offsets[s]
            np.take(maps[s], local, axis=0, out=out[start:stop])
        return out

    def gather(self, site: str, indices: np.ndarray) -> torch.Tensor:
        return self._to_tensor(self.gather_numpy(site, indices))

    def read_all(self, site: str) -> torch.Tensor:
        """Every row of a site in global order (small caches and tests)."""
        return self._to_tensor(np.concatenate(self._memmaps(site)))

    # ------------------------------------------------------------------ integrity
    def verify(self) -> None:
        """Recompute every shard's sha256; raise CacheError naming the first bad file."""
        for shard in self.manifest["shards"]:
            for entry in shard["files"].values():
                self._verify_file(entry)

    def _verify_file(self, entry: dict) -> None:
        path = self.path / entry["path"]
        if not path.exists():
            raise CacheError(f"cache shard {path} is missing")
        if file_sha256(path) != entry["sha256"]:
            raise CacheError(
                f"cache shard {path} is corrupt (sha256 mismatch with manifest.json); "
                "re-create the cache (delete the directory and run sae-cache again)")
