"""How our TopK SAE step scales with the dictionary size and with k, vs the dense reference.

    python benchmarks/sae_scaling.py                        # CPU default: ~12 min on 2 cores
    python benchmarks/sae_scaling.py --batch 2048 --precision bf16 --widths 2048 \\
        --latents 4096,16384,65536 --ks 32,64,128 --plot docs/img/sae_scaling_bf16.png

Two sweeps per input width d: latents (k fixed) and k (latents fixed). Each point is
sae_step.py's bench_size (same synthetic data and initial weights for both rows, interleaved
rounds, median step time) with the rows "ours" (TopKSAE impl=sparse, fused Adam) and
"reference" (plain dense TopK, torch Adam). Prints one markdown table per sweep and saves a
plot of tokens/s (log scale) with the speedup written at each point.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as in sae_step.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_step import bench_size  # noqa: E402

import torch  # noqa: E402


def sweep(args, d: int, name: str, points: list[int]) -> list[dict]:
    results = []
    for value in points:
        n_latents = value if name == "latents" else args.fixed_latents
        k = value if name == "k" else args.fixed_k
        run_args = argparse.Namespace(batch=args.batch, k=k, steps=args.steps,
                                      rounds=args.rounds, impls=["reference", "ours"],
                                      cache=None, sites=[])
        rows = {r["impl"]: r for r in bench_size(run_args, d, n_latents, args.precision)}
        ours, ref = rows["ours"]["tokens_per_s"], rows["reference"]["tokens_per_s"]
        results.append({"d": d, "n_latents": n_latents, "k": k, "ours": ours, "reference": ref,
                        "fvu_ours": rows["ours"]["fvu"], "fvu_ref": rows["reference"]["fvu"]})
        print(f"| {d} | {n_latents} | {k} | {ref:,.0f} | {ours:,.0f} | {ours / ref:.2f}x | "
              f"{rows['ours']['fvu']:.4f} | {rows['reference']['fvu']:.4f} |", flush=True)
    return results


def plot(results: dict, widths: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(widths), 2, figsize=(10, 3.6 * len(widths)), squeeze=False)
    for row, d in enumerate(widths):
        for col, name in enumerate(("latents", "k")):
            ax = axes[row][col]
            points = results[(d, name)]
            xs = [p["n_latents"] if name == "latents" else p["k"] for p in points]
            for impl, style in (("ours", "o-"), ("reference", "s--")):
                ax.plot(xs, [p[impl] for p in points], style, label=impl)
            for x, p in zip(xs, points):
                ax.annotate(f"{p['ours'] / p['reference']:.1f}x", (x, p["ours"]),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            fixed = f"k={points[0]['k']}" if name == "latents" else \
                f"latents={points[0]['n_latents']}"
            ax.set_title(f"d={d}, {fixed}")
            ax.set_xlabel("latents" if name == "latents" else "k")
            ax.set_ylabel("tokens/s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="640,2048", help="input widths d")
    parser.add_argument("--latents", default="4096,8192,16384,32768,65536")
    parser.add_argument("--ks", default="16,32,64,128,256")
    parser.add_argument("--fixed-k", type=int, default=64, help="k of the latents sweep")
    parser.add_argument("--fixed-latents", type=int, default=16384, help="latents of the k sweep")
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--plot", default="docs/img/sae_scaling.png")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(v) for v in args.widths.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"precision {args.precision}, {args.rounds} rounds x {args.steps} steps")
    results = {}
    for name, points in (("latents", args.latents), ("k", args.ks)):
        print(f"\n| d | latents | k | reference tokens/s | ours tokens/s | speedup | FVU ours | "
              f"FVU reference |")
        print("|---|---|---|---|---|---|---|---|")
        for d in widths:
            results[(d, name)] = sweep(args, d, name, [int(v) for v in points.split(",")])
    plot(results, widths, Path(args.plot),
         f"TopK SAE step, batch {args.batch}, "
         f"{'fp32' if args.precision == '32' else args.precision}, "
         f"{torch.get_num_threads()} CPU threads: ours vs dense reference")


if __name__ == "__main__":
    main()
