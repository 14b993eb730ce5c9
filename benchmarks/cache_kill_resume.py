"""SIGKILL `sae-cache` at random points, resume it, and check the result is byte-identical to an
uninterrupted run with no stray files (temp files, lock, unlisted shards).

    python benchmarks/cache_kill_resume.py --runs 10 [--seed 0] [--work /tmp/kill-resume]

Each run starts `sae-cache` (tiny Llama, every resid and mlp site, small shards so a kill can land
between, inside or after shard writes), waits until it has started caching (its manifest exists),
sleeps a random fraction of the reference run's caching time, SIGKILLs it, then re-runs the same
command to completion. Prints one line per run and a final ``k/N identical``; exits 1 unless N/N.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

OVERRIDES = ["model=tiny_llama", "sites=[layers.*.resid,layers.*.mlp]", "progress=false",
             "cache.batch_size=4", "cache.shard_tokens=256", "cache.dtype=float32",
             "cache.max_tokens=4096"]


def _command(cache_dir: Path, work: Path) -> list[str]:
    return [sys.executable, "-c", "from sae_train.apps.cache_app import main; main()",
            *OVERRIDES, f"cache.dir={cache_dir}", f"paths.root={work}",
            f"hydra.run.dir={work}/hydra/{cache_dir.name}"]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_to_end(cache_dir: Path, work: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(_command(cache_dir, work), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sae-cache failed on {cache_dir}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _reference(work: Path, env: dict) -> tuple[dict[str, bytes], float]:
    """An uninterrupted cache, and how long its caching phase takes (manifest → exit)."""
    ref = work / "reference"
    _run_to_end(ref, work, env)  # also materialises the tiny model once
    shutil.rmtree(ref)
    process = subprocess.Popen(_command(ref, work), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while not (ref / "manifest.json").exists() and process.poll() is None:
        time.sleep(0.005)
    started = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit("reference sae-cache run failed")
    return _files(ref), time.perf_counter() - started


def _killed_then_resumed(index: int, delay: float, work: Path, env: dict,
                         reference: dict[str, bytes]) -> tuple[bool, str]:
    cache = work / f"run{index:02d}"
    process = subprocess.Popen(_command(cache, work), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while not (cache / "manifest.json").exists() and process.poll() is None:
        time.sleep(0.005)
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    left = _files(cache)
    shards = sum(1 for name in left if name.startswith("meta/") and name.endswith(".npy"))
    strays = [n for n in left if Path(n).name.startswith(".")]
    _run_to_end(cache, work, env)
    files = _files(cache)
    identical = files == reference
    detail = (f"run {index + 1}: {'killed' if killed else 'finished before the kill'} after "
              f"+{delay:.2f}s ({shards} meta shard files, {len(strays)} temp/lock file(s) left); "
              f"resumed: {'byte-identical' if identical else 'DIFFERENT'}")
    if not identical:
        differing = sorted(set(files) ^ set(reference) |
                           {n for n in files if n in reference and files[n] != reference[n]})
        detail += f" (differing: {differing[:5]})"
    shutil.rmtree(cache)
    return identical and killed, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/foxp2-kill-resume"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = {**os.environ, "FOXP2_CACHE": str(args.work / "models"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    reference, caching_time = _reference(args.work, env)
    n_shards = sum(1 for n in reference if n.startswith("meta/"))
    print(f"reference: {len(reference)} files, {n_shards} shards per site, caching phase "
          f"{caching_time:.2f}s", flush=True)
    rng = random.Random(args.seed)
    good = 0
    for index in range(args.runs):
        ok, detail = _killed_then_resumed(index, rng.uniform(0, 0.9 * caching_time), args.work,
                                          env, reference)
        good += ok
        print(detail, flush=True)
    print(f"{good}/{args.runs} killed runs resumed byte-identical with no stray files")
    sys.exit(0 if good == args.runs else 1)


if __name__ == "__main__":
    main()
