"""One process with every core's thread vs one single-thread process per core, at the same time.

    python benchmarks/parallel_processes.py                       # demo model
    python benchmarks/parallel_processes.py --model tiny_llama    # smoke run

Why: ``foxp2-demo parallel_targets=true`` runs each target's localise → steer in its own process
with ``cores // targets`` torch threads instead of one process after the other with all of them.
The work unit is what the steer stage repeats: a batch of prompts through the model with the
last position's logits (generation's prefill) and a batch of held-out text with full-vocabulary
log-probs (the KL and NLL scores). Rows: ``sequential`` runs two units one after the other in one
process with ``--threads`` threads (the reference); ``parallel`` runs one unit in each of two
processes at once with ``--threads // 2`` threads each. Throughput = units per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def unit(model, ids) -> None:
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, logits_to_keep=1)
            model(input_ids=ids[:, :40]).logits.float().log_softmax(-1)


def child(model_name: str, threads: int, units: int) -> dict:
    import torch

    from steering import api

    torch.set_num_threads(threads)
    model, _, _ = api.load_model(f"model={model_name}")
    ids = torch.randint(10, min(20000, model.config.vocab_size), (16, 48),
                        generator=torch.Generator().manual_seed(0))
    unit(model, ids[:2])  # warm-up
    print("READY", flush=True)
    sys.stdin.readline()  # the parent starts every child at once
    t0 = time.perf_counter()
    for _ in range(units):
        unit(model, ids)
    return {"seconds": time.perf_counter() - t0}


def run(cmds: list[list[str]]) -> list[dict]:
    procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for c in cmds]
    for p in procs:  # every model loaded before any timing starts
        while p.stdout.readline().strip() != "READY":
            pass
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, *args.child)), flush=True)
        return
    base = [sys.executable, __file__, "--model", args.model, "--child"]
    half = max(1, args.threads // 2)
    seq = run([base + [str(args.threads), "2"]])[0]["seconds"]
    par = max(r["seconds"] for r in run([base + [str(half), "1"], base + [str(half), "1"]]))
    from sae_train.models.loading import cpu_has_native_bf16

    cpu = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no native bf16"
    print(f"model {args.model}; CPU {cpu}, {args.threads} cores; 2 work units\n"
          "| mode | processes × threads | seconds | units / s |\n|---|---|---|---|")
    print(f"| sequential (reference) | 1 × {args.threads} | {seq:.1f} | {2 / seq:.3f} |")
    print(f"| parallel | 2 × {half} | {par:.1f} | {2 / par:.3f} |")
    print(f"parallel / sequential throughput: {seq / par:.2f}×")


if __name__ == "__main__":
    main()
