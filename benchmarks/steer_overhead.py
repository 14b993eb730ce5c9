"""Steered vs unsteered greedy generation: the cost of the steering hooks.

    python benchmarks/steer_overhead.py                                 # demo model, batch 16
    python benchmarks/steer_overhead.py --artifact foxp2_runs/demo/gemma3_270m/steer-hi/artifacts/foxp2
    python benchmarks/steer_overhead.py --model tiny_llama --rounds 3   # smoke run

Rows (same prompts, same model, interleaved round by round; medians):
  plain        model.generate without hooks
  prompt_end   steered, position=prompt_end (the default: prompt end + decode_steps tokens)
  all          steered at every position (the worst case: every decode step edits)
Without --artifact a synthetic FOXP2-shaped artifact is used: resid edits at 6 consecutive
layers with a push and an English term on 16 SAE features (the demo's sizes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def synthetic_artifact(model, layers: list[int], n_features: int = 16):
    from steering.steer.artifact import LayerEdit, SteeringArtifact

    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    edits = [LayerEdit(layer=l, space="resid", add=torch.randn(d, generator=g),
                       remove_encoder=torch.randn(n_features, d, generator=g) / d ** 0.5,
                       remove_bias=torch.zeros(n_features),
                       remove_mean=torch.rand(n_features, generator=g),
                       remove_decoder=torch.randn(n_features, d, generator=g) / d ** 0.5)
             for l in layers]
    return SteeringArtifact(method="synthetic", target="es", edits=edits, lam=1.0, beta=1.0)


def main() -> None:
    from omegaconf import OmegaConf

    from sae_train.config import ModelConfig
    from sae_train.corpora.embedded import load_embedded_prompts
    from sae_train.models.loading import load_model
    from steering.language.defaultness import DEFAULT_TEMPLATE, left_pad, pad_token_id
    from steering.steer.artifact import SteeringArtifact
    from steering.steer.runtime import steer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma3_270m", help="a conf/model/ name")
    p.add_argument("--artifact", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    from steering.apps import config_dir

    raw = OmegaConf.load(f"{config_dir()}/model/{args.model}.yaml")
    raw.pop("defaults", None)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    model, tokenizer, info = load_model(cfg)
    n_layers = model.config.num_hidden_layers
    art = SteeringArtifact.load(args.artifact) if args.artifact else \
        synthetic_artifact(model, list(range(min(3, n_layers - 1), min(9, n_layers))))
    prompts = [DEFAULT_TEMPLATE.format(prompt=t) for t in
               [q.text for q in load_embedded_prompts(["evaluation"])][:args.batch]]
    pad = pad_token_id(tokenizer)
    ids, attn = left_pad([tokenizer(t)["input_ids"] for t in prompts], pad)

    @torch.no_grad()
    def run(mode: str | None) -> float:
        ctx = steer(model, art, position=mode) if mode else torch.no_grad()
        t0 = time.perf_counter()
        with ctx:
            model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t0

    modes = {"plain": None, "prompt_end": "prompt_end", "all": "all"}
    run(None)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, mode in modes.items():
            times[name].append(run(mode))
    base = statistics.median(times["plain"])
    new = args.batch * args.new_tokens
    print(f"\n{info.name}, {info.dtype}, batch "
          f"{args.batch}, {args.new_tokens} new tokens, {len(art.edits)} edited layers "
          f"({art.method}), {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"| row | seconds | new tokens/s | overhead vs plain |\n|---|---|---|---|")
    for name in modes:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {new / t:,.0f} | {100 * (t / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
