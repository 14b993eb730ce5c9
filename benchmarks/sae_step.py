"""Training-step throughput, peak memory and FVU of our TopK SAE vs a plain dense PyTorch TopK
and EleutherAI sparsify's step, and the end-to-end Lightning run from an on-disk cache vs the
bare step.

    python benchmarks/sae_step.py                          # CPU: batch 2048, fp32 and bf16
    python benchmarks/sae_step.py --batch 8192 --precision bf16          # GPU-sized
    python benchmarks/sae_step.py --cache /tmp/demo_cache \\
        --sites layers.6.resid,layers.6.mlp                # real activations (d=640, 2048)

Rows of the step table (same data, same initial weights, same number of steps each):
  reference    a plain dense TopK written the obvious way: relu(linear) → topk → scatter into
               dense codes → codes @ W_dec, FVU loss, Adam, decoder renormalised
  ours-dense   TopKSAE(impl=dense): our module with plain autograd (input scaling, AuxK,
               projected decoder gradient) and SAETrainingModule's optimizer (fused Adam)
  ours         TopKSAE(impl=sparse): the same with sparse_ops' kernels (what sae-train runs)
  sparsify     EleutherAI sparsify's SparseCoder (`pip install eai-sparsify`, the `bench`
               extra; without Triton it uses its eager CPU decoder), its gradient projection
               and unit-norm decoder, torch's Adam; skipped with a note if not installed
Timings are medians over interleaved rounds (the machine may be shared and noisy); FVU is
measured on a held-out batch after the run. "peak MiB" is the largest resident-memory growth
during that row's steps above what the process held before them (weights and Adam state of
every row are allocated up front, so it counts the step's own buffers: gradients,
activations, temporaries), sampled every 2 ms from /proc/self/statm. With --cache, the SAE
sizes use the cache's real activations (the site whose width is d) and the end-to-end table
trains through Lightning from the cache (ActivationDataModule → SAETrainingModule, metrics and
logging on, validation off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext

# Large tensors on transparent huge pages: each step allocates several (n_latents, d) buffers,
# and first-touch page faults on 4 KiB pages cost more than the arithmetic on them. Applies to
# every row alike; must be set before torch allocates them.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class DenseTopKReference(nn.Module):
    """The plain implementation the speed is compared against."""

    def __init__(self, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                 b_dec: torch.Tensor, k: int):
        super().__init__()
        self.W_enc, self.b_enc = nn.Parameter(w_enc.clone()), nn.Parameter(b_enc.clone())
        self.W_dec, self.b_dec = nn.Parameter(w_dec.clone()), nn.Parameter(b_dec.clone())
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        values, indices = pre.topk(self.k, dim=-1)
        codes = torch.zeros_like(pre).scatter(1, indices, values)
        recon = codes @ self.W_dec + self.b_dec
        fvu = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        return recon, fvu


def sparsify_missing() -> str | None:
    """Why the sparsify row cannot run, or None."""
    try:
        import sparsify  # noqa: F401
    except ImportError as error:
        return (f"sparsify row skipped: eai-sparsify is not importable ({error}); "
                "`pip install -e .[bench]` (or `pip install --no-deps eai-sparsify` plus its "
                "pure-python deps natsort, schedulefree, simple-parsing) adds it")
    return None


def make_sparsify(template, k: int):
    """sparsify's SparseCoder with ``template``'s weights (it trains on normalised inputs)."""
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(template.d_in, SparseCoderConfig(num_latents=template.n_latents, k=k))
    with torch.no_grad():
        coder.encoder.weight.copy_(template.W_enc)
        coder.encoder.bias.copy_(template.b_enc)
        coder.W_dec.copy_(template.W_dec)
        coder.b_dec.copy_(template.b_dec)
    return coder


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss_growth(interval: float = 0.002):
    """Yields a dict whose "bytes" is, on exit, the largest RSS growth seen inside."""
    result = {"bytes": 0}
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["bytes"] = max(peak[0], _rss_bytes()) - start


def activations(args, d: int, n_tokens: int) -> tuple[torch.Tensor, str]:
    """(n_tokens, d) float32: real rows of the cached site of width d, else synthetic data."""
    if args.cache:
        from sae_train.cache.reader import ActivationCache

        cache = ActivationCache(args.cache)
        for site in args.sites:
            if cache.width(site) == d:
                rng = np.random.default_rng(0)
                rows = np.sort(rng.choice(cache.n_tokens, min(n_tokens, cache.n_tokens),
                                          replace=False))
                x = cache.gather(site, rows).to(torch.float32)
                if len(x) < n_tokens:
                    x = x.repeat(-(-n_tokens // len(x)), 1)[:n_tokens]
                return x, site
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(4 * d, d, generator=g)
    codes = torch.rand(n_tokens, 4 * d, generator=g).pow(30)  # sparse-ish, heavy-tailed
    return codes @ atoms + 0.1 * torch.randn(n_tokens, d, generator=g), "synthetic"


def bench_size(args, d: int, n_latents: int, precision: str) -> list[dict]:
    from sae_train.saes import build_sae
    from sae_train.training.module import make_optimizer

    n_batches = 4
    data, source = activations(args, d, args.batch * (n_batches + 1))
    batches = list(data[:args.batch * n_batches].split(args.batch))
    held_out = data[args.batch * n_batches:]
    torch.manual_seed(0)
    template = build_sae({"kind": "topk", "n_latents": n_latents, "k": args.k}, d)
    template.initialize_from_data(data[:min(len(data), 16384)])
    scale = float(template.input_scale)
    lr = 2e-4 / (n_latents / 2 ** 14) ** 0.5
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else nullcontext

    runs = {}
    for impl in args.impls:
        if impl == "reference":
            model = DenseTopKReference(template.W_enc.data, template.b_enc.data,
                                       template.W_dec.data, template.b_dec.data, args.k)

            def step(x, model=model):
                with autocast():
                    _, loss = model(x * scale)  # the reference trains on normalised inputs
                loss.backward()
                return loss
        elif impl == "sparsify":
            model = make_sparsify(template, args.k)
            dead = torch.zeros(n_latents, dtype=torch.bool)

            def step(x, model=model, dead=dead):
                with autocast():
                    out = model(x * scale, dead_mask=dead)
                (out.fvu + out.auxk_loss / 32).backward()  # its trainer's default auxk_alpha
                model.remove_gradient_parallel_to_decoder_directions()
                return out.fvu
        else:
            model = build_sae({"kind": "topk", "n_latents": n_latents, "k": args.k,
                               "impl": "sparse" if impl == "ours" else "dense"}, d)
            model.load_state_dict(template.state_dict())
            dead = torch.zeros(n_latents, dtype=torch.bool)

            def step(x, model=model, dead=dead):
                with autocast():
                    out = model(x, dead_mask=dead)
                out.loss.backward()
                model.remove_parallel_decoder_grad()
                return out.losses["fvu"]
        # The reference and sparsify use torch's default Adam; ours the optimizer
        # SAETrainingModule uses.
        optimizer = torch.optim.Adam(model.parameters(), lr=lr) \
            if impl in ("reference", "sparsify") else make_optimizer(model.parameters(), lr)

        def full_step(x, step=step, model=model, optimizer=optimizer):
            loss = step(x)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.W_dec.div_(model.W_dec.norm(dim=1, keepdim=True))
            return loss

        runs[impl] = (model, full_step, [], [])
        full_step(batches[0])  # warm-up (allocations, first-call costs; Adam state)

    for r in range(args.rounds):  # interleaved so machine noise hits every row alike
        for impl, (_, full_step, times, peaks) in runs.items():
            with peak_rss_growth() as peak:
                start = time.perf_counter()
                for s in range(args.steps):
                    full_step(batches[(r * args.steps + s) % n_batches])
                times.append((time.perf_counter() - start) / args.steps)
            peaks.append(peak["bytes"])

    rows = []
    for impl, (model, _, times, peaks) in runs.items():
        with torch.no_grad():
            if impl == "reference":
                fvu = float(model(held_out * scale)[1])
            elif impl == "sparsify":
                fvu = float(model(held_out * scale).fvu)
            else:
                fvu = float(model(held_out).losses["fvu"])
        seconds = statistics.median(times)
        rows.append({"d": d, "n_latents": n_latents, "impl": impl, "source": source,
                     "precision": precision, "ms_per_step": 1000 * seconds,
                     "tokens_per_s": args.batch / seconds, "peak_mib": max(peaks) / 2 ** 20,
                     "fvu": fvu})
    return rows


def bench_lightning(args, site: str, n_latents: int) -> float:
    """Steady-state tokens/s of `sae-train`'s pieces on the cache (steps after warm-up)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from sae_train.cache.reader import ActivationCache
    from sae_train.training import SAETrainingModule
    from sae_train.cache.datamodule import ActivationDataModule

    width = ActivationCache(args.cache).width(site)
    warm, measured = 3, args.e2e_steps

    class Clock(L.Callback):
        def __init__(self):
            self.marks = {}

        def on_train_batch_end(self, trainer, *a):
            self.marks[trainer.global_step] = time.perf_counter()

    clock = Clock()
    module = SAETrainingModule({"kind": "topk", "n_latents": n_latents, "k": args.k},
                               {site: width}, stats_tokens=16384)
    datamodule = ActivationDataModule(args.cache, [site], args.batch, val_splits=None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu", max_steps=warm + measured, max_epochs=-1,
                            precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                            logger=CSVLogger(tmp), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, log_every_n_steps=10, callbacks=[clock],
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=datamodule)
    return args.batch * measured / (clock.marks[warm + measured] - clock.marks[warm])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048, help="tokens per step")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sizes", default="640x16384,2048x32768", help="d x n_latents, ...")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impls", default="reference,ours,sparsify",
                        help="of reference, ours-dense, ours, sparsify")
    parser.add_argument("--precision", default="32,bf16",
                        help="comma list of 32 / bf16 (bf16: autocast; Lightning: bf16-mixed)")
    parser.add_argument("--cache", help="activation cache for real data and the Lightning run")
    parser.add_argument("--sites", default="layers.6.resid,layers.6.mlp")
    parser.add_argument("--e2e-steps", type=int, default=12, help="timed Lightning steps")
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    args.impls = args.impls.split(",")
    args.sites = args.sites.split(",")
    precisions = args.precision.split(",")
    if "sparsify" in args.impls and (why := sparsify_missing()):
        print(why)
        args.impls.remove("sparsify")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"k {args.k}, {args.rounds} rounds x {args.steps} steps after 1 warm-up step, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")

    print("\n| precision | d | latents | impl | data | ms/step | tokens/s | vs reference | "
          "vs sparsify | peak MiB | FVU (held out) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    bare = {}
    for precision in precisions:
        for d, n_latents in sizes:
            rows = bench_size(args, d, n_latents, precision)
            rate = {r["impl"]: r["tokens_per_s"] for r in rows}
            for r in rows:
                ratios = [f"{r['tokens_per_s'] / rate[base]:.2f}x" if base in rate else "-"
                          for base in ("reference", "sparsify")]
                print(f"| {precision} | {d} | {n_latents} | {r['impl']} | {r['source']} | "
                      f"{r['ms_per_step']:.0f} | {r['tokens_per_s']:,.0f} | {ratios[0]} | "
                      f"{ratios[1]} | {r['peak_mib']:,.0f} | {r['fvu']:.4f} |", flush=True)
                if r["impl"] == "ours":
                    bare[(precision, d, n_latents)] = (r["tokens_per_s"], r["source"])

    if args.cache:
        print("\n| precision | site | d | latents | bare step tokens/s | "
              "Lightning from cache tokens/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for (precision, d, n_latents), (_, site) in bare.items():
            if site == "synthetic":
                continue
            # Bare step and Lightning measured back to back, alternating, in the same state.
            run_args = argparse.Namespace(**{**vars(args), "impls": ["ours"],
                                             "precision": precision})
            pairs = []
            for _ in range(args.e2e_rounds):
                bare_rate = bench_size(run_args, d, n_latents, precision)[0]["tokens_per_s"]
                pairs.append((bare_rate, bench_lightning(run_args, site, n_latents)))
            bare_rate = statistics.median(p[0] for p in pairs)
            e2e = statistics.median(p[1] for p in pairs)
            print(f"| {precision} | {site} | {d} | {n_latents} | {bare_rate:,.0f} | {e2e:,.0f} | "
                  f"{e2e / bare_rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
