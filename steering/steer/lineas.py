"""LinEAS (Rodriguez et al., arXiv 2503.10679) as an external baseline on MLP neurons.

Per-layer affine maps on *every* neuron of the steered layers, x ← x + s ⊙ x + σ ⊙ θ (the
:class:`~steering.learned.NeuronShift` in affine mode), trained end to end so that the
distribution of the maps' outputs on English text matches that of the unsteered model on
target-language text, layer by layer, in sliced Wasserstein distance::

    L = Σ_ℓ SW²( {x̃_ℓ(english tokens)}, {x_ℓ(target tokens)} ) / σ-normalised  +  ρ · (|s|₁ + |θ|₁)

(x̃: activations with the maps of layers ≤ ℓ active, so earlier maps' effects are seen;
SW² = mean over random unit projections of the squared difference of sorted projections.)
The L1 term is the same proximal step as the learned steer's, so the maps are sparse. The
maps act on every position while training, as LinEAS does; the artifact is placed like every
other method's (the steer stage's position mode) and its strength γ is tuned the same way.
No teacher answers are used: LinEAS needs only unpaired English and target text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from sae_train.models.sites import site_module
from steering.steer.learned import (LearnedSteerError, LearnResult, NeuronShift, Support,
                              finish, frozen, proximal_step, right_pad)


@dataclass
class LineasConfig:
    steps: int = 150
    lr: float = 0.01
    batch_size: int = 8  # English sentences per step
    n_projections: int = 256
    l1_weight: float = 0.002
    max_target_tokens: int = 4096  # target activations kept per layer
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "n_projections", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise LearnedSteerError(f"lineas.{name}={getattr(self, name)}: must be ≥ 1")
        if not self.lr > 0 or not self.l1_weight >= 0:
            raise LearnedSteerError(f"lineas.lr={self.lr}, lineas.l1_weight={self.l1_weight}: "
                                    "lr must be > 0 and l1_weight ≥ 0")


def _capture(model, support: Support, steer: Optional[NeuronShift], ids: Tensor,
             mask: Tensor) -> dict[int, Tensor]:
    """Per layer, the (edited, when ``steer``) neuron activations of the real tokens past the
    first (BOS) of a right-padded batch: (tokens, width)."""
    device = next(model.parameters()).device
    keep = mask.bool().clone()
    keep[:, 0] = False
    keep = keep.to(device)
    out: dict[int, Tensor] = {}
    handles = []
    for layer in support.layers:
        module, _ = site_module(model, f"layers.{layer}.mlp")
        index = support.index[layer].to(device)

        def pre_hook(_m, args, layer=layer, index=index):
            x = args[0]
            if steer is not None:
                x = x.index_add(-1, index, steer.delta(layer, x.index_select(-1, index)))
            out[layer] = x[keep].float()
            return (x, *args[1:]) if steer is not None else None
        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        # the decoder only: the LM head is not needed
        body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def sliced_wasserstein(a: Tensor, b: Tensor, projections: Tensor) -> Tensor:
    """SW² between point sets ``a`` (n, d) and ``b`` (m, d) along unit ``projections`` (d, P);
    the larger set is subsampled to the smaller's size by quantile matching."""
    pa, pb = (a @ projections).sort(0).values, (b @ projections).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        n = min(pa.shape[0], pb.shape[0])
        pick = lambda p: p[torch.linspace(0, p.shape[0] - 1, n, device=p.device).round().long()]  # noqa: E731
        pa, pb = pick(pa), pick(pb)
    return ((pa - pb) ** 2).mean()


def learn_lineas(model, support: Support, english: Sequence[Sequence[int]],
                 target: Sequence[Sequence[int]], cfg: LineasConfig, *, target_lang: str,
                 english_lang: str = "en", method: str = "lineas", position: str = "prompt_end",
                 decode_steps: int = 4, sustain: float = 0.0, pad_id: int = 0,
                 provenance: Optional[dict] = None) -> LearnResult:
    """Train LinEAS maps on ``support`` (every neuron of the layers, usually) and return the
    artifact (neuron edits with shift and gain, λ = 1, β = 0)."""
    from tqdm.auto import tqdm

    if not english or not target:
        raise LearnedSteerError("LinEAS needs English and target-language sentences")
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    with frozen(model):
        goal = _target_activations(model, support, target, cfg, pad_id)
        steer = NeuronShift(support, "zero", affine=True).to(device)
        opt = torch.optim.Adam(steer.parameters_by_group(), lr=cfg.lr)
        history: list[dict] = []
        bar = tqdm(range(cfg.steps), desc=f"LinEAS ({target_lang})", disable=not cfg.progress)
        for step in bar:
            pick = torch.randint(len(english), (min(cfg.batch_size, len(english)),),
                                 generator=gen).tolist()
            ids, mask = right_pad([english[i] for i in pick], pad_id)
            acts = _capture(model, support, steer, ids, mask)
            loss = torch.zeros((), device=device)
            for l in support.layers:
                sigma = support.scale[l].to(device)
                proj = torch.randn(sigma.numel(), cfg.n_projections, generator=gen).to(device)
                proj = proj / proj.norm(dim=0, keepdim=True)
                mine = acts[l][:, support.index[l].to(device)] / sigma
                loss = loss + sliced_wasserstein(mine, goal[l] / sigma, proj)
            proximal_step(opt, steer, loss, cfg.l1_weight)
            history.append({"step": step, "sw": float(loss.detach()),
                            "nonzero": steer.n_nonzero()})
            bar.set_postfix(sw=f"{history[-1]['sw']:.4f}", nz=history[-1]["nonzero"])
    return finish(steer, history, started, asdict(cfg), kind="lineas", provenance=provenance,
                  target=target_lang, english=english_lang, method=method, position=position,
                  decode_steps=decode_steps, sustain=sustain)


@torch.no_grad()
def _target_activations(model, support: Support, target: Sequence[Sequence[int]],
                        cfg: LineasConfig, pad_id: int) -> dict[int, Tensor]:
    """Per layer, the unsteered support activations of the target-language tokens."""
    device = next(model.parameters()).device
    goal: dict[int, list] = {l: [] for l in support.layers}
    for start in range(0, len(target), 16):
        ids, mask = right_pad(target[start:start + 16], pad_id)
        for l, acts in _capture(model, support, None, ids, mask).items():
            goal[l].append(acts[:, support.index[l].to(device)])
    return {l: torch.cat(v)[:cfg.max_target_tokens] for l, v in goal.items()}
