"""The lift's edited generations with one prompt pass per row vs one per distinct prompt.

    python benchmarks/lift_shared_prompt.py                      # demo model, 3 layers
    python benchmarks/lift_shared_prompt.py --model tiny_llama   # smoke run (seconds)

The timed work is foxp2-localise's lift at one layer as the demo runs it (``lift.n_prompts=8``
discovery prompts, ``lift.top_m=8`` features × 3 pushes α, batches of 64 rows, 3 greedy
steps): the reference runs every row's prompt pass through every layer
(``share_prompt_pass=False``, the edit as a per-row hook); the shared pass runs the layers
below the edit once per distinct prompt and fans out above it
(:func:`steering.localise.lift.shared_prompt_edit`). Directions are random unit vectors (the
cost does not depend on them). Printed per layer: seconds of each (best of ``--repeats``), the
largest |ΔM| difference between the two, and for scale the largest |ΔM| difference of the
reference with itself at half the batch size (bf16 sums depend on the batch's shape, and a
flipped greedy token moves a row's ΔM over the later steps).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--layers", default="2,9,15", help="edited layers (comma-separated)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from sae_train.corpora.embedded import load_embedded_prompts
    from sae_train.models.loading import cpu_has_native_bf16
    from sae_train.models.sites import decoder_layers
    from steering import api
    from steering.language.token_sets import LanguageTokenSets
    from steering.localise.lift import logit_mass_lift, typical_norm_from_model

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = api.load_model(f"model={args.model}")
    tokenizer.padding_side = "left"
    prompts = [p.text for p in load_embedded_prompts(["discovery"])][:args.prompts]
    vocab = len(tokenizer)
    ids = torch.arange(vocab).numpy()
    sets = LanguageTokenSets.from_ids({"es": ids[ids % 7 == 0], "en": ids[ids % 7 == 1]}, vocab)
    n_layers = len(decoder_layers(model))
    layers = [min(int(x), n_layers - 1) for x in args.layers.split(",")]
    width = model.config.hidden_size
    cpu = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no native bf16"
    print(f"model {args.model} ({model.dtype}), {len(prompts)} prompts × {args.features} "
          f"features × 3 α, batches of {args.batch_size}; CPU {cpu}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s); best of {args.repeats}")
    print("| layer | one pass per row s | shared prompt pass s | speed-up | max abs ΔM diff | "
          "same, reference at half the batch |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for layer in layers:
        site = f"layers.{layer}.resid"
        dirs = torch.randn(args.features, width, generator=torch.Generator().manual_seed(layer))
        scale = typical_norm_from_model(model, tokenizer, prompts, site)
        results, seconds = {}, {}
        for shared in (False, True):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                results[shared] = logit_mass_lift(
                    model, tokenizer, prompts, sets, "es", site, dirs, scale=scale,
                    batch_size=args.batch_size, baseline=torch.zeros(len(prompts)),
                    share_prompt_pass=shared)
                best = min(best, time.perf_counter() - t0)
            seconds[shared] = best
        diff = float((results[True].delta_m - results[False].delta_m).abs().max())
        half = logit_mass_lift(model, tokenizer, prompts, sets, "es", site, dirs, scale=scale,
                               batch_size=max(1, args.batch_size // 2),
                               baseline=torch.zeros(len(prompts)), share_prompt_pass=False)
        noise = float((half.delta_m - results[False].delta_m).abs().max())
        totals[0] += seconds[False]
        totals[1] += seconds[True]
        print(f"| {layer} | {seconds[False]:.2f} | {seconds[True]:.2f} | "
              f"{seconds[False] / seconds[True]:.2f}× | {diff:.2g} | {noise:.2g} |")
    print(f"| all | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f}× | | |")


if __name__ == "__main__":
    main()
