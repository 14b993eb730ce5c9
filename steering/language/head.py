"""A causal LM split into its decoder body and its output head, and every score the steering
stages take from the head without the full-vocabulary float32 logits:

- ``OutputHead.token_nll``: −log p(target) per position, differentiable (the relevance PMI,
  the continuation NLL guard, the learned steer's answer NLL);
- ``OutputHead.kl_and_nll``: KL(steered ‖ base) and both NLLs of held-out text in one pass;
- ``OutputHead.step_masses`` with ``HeadBypass``: one greedy step's token-set masses and
  argmax (every decode: generation, ΔM, the lift), the model's own head call skipped.

Every teacher-forced score of the steering stage (the relevance guard's PMI, the continuation
NLL guard, the learned steer's answer NLL) needs ``−log p(target)`` at a few positions, i.e.
one logsumexp over the vocabulary and one logit per position. With Gemma's 262k-token
vocabulary the plain way, ``head(h).float().log_softmax(-1)``, writes and re-reads a
(positions × 262k) float32 tensor several times and costs more than the model's body. Here
the head runs in vocabulary chunks sized to stay in cache, with an online logsumexp: the same
bf16 logits, the same float32 result to ~1e-5, 2.7× faster on 400 positions of the demo model
on one CPU thread (``benchmarks/head_nll.py``). Its backward recomputes each chunk's softmax,
so nothing of vocabulary size is kept for autograd either. A greedy step of 16 rows costs
half of the model's head call followed by the float32 softmax.

The head's own transformation of the logits is applied exactly: a bias, Gemma-2's final
tanh soft-capping, a logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``).
An architecture whose ``forward`` does anything else to its logits is not covered; the tests
compare against the model's own logits on tiny Llama and Gemma3 models.

Imports nothing from ``steering`` outside this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def decoder_body(model):
    """The decoder stack of an HF causal LM: ``input_ids → last_hidden_state`` (final norm
    included), without the LM head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


@torch.no_grad()
def final_hidden(model, **inputs) -> Tensor:
    """The final hidden states (B, L, d) (final norm included) of a full ``model(**inputs)``
    call, the LM head skipped (:class:`HeadBypass`). Unlike calling :func:`decoder_body`
    directly, every hook on the model itself runs (the steering runtime tracks prompts there)."""
    with HeadBypass(model) as bypass:
        model(**inputs, use_cache=False)
    return bypass.hidden


def _config_value(model, name: str):
    config = model.config
    value = getattr(config, name, None)
    if value is None and getattr(config, "text_config", None) is not None:
        value = getattr(config.text_config, name, None)
    return value


@dataclass
class OutputHead:
    """The LM head of a model as ``logits = post(h Wᵀ + b)``; ``post`` is the logit scale then
    the soft-cap, both optional."""

    weight: Tensor  # (V, d), the model's dtype
    bias: Optional[Tensor] = None
    softcap: Optional[float] = None
    scale: float = 1.0

    @classmethod
    def of(cls, model) -> "OutputHead":
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"{type(model).__name__}'s output embedding is "
                            f"{type(head).__name__}, not a Linear layer")
        scale = float(_config_value(model, "logit_scale") or 1.0)
        scaling = _config_value(model, "logits_scaling")
        if scaling:
            scale /= float(scaling)
        return cls(head.weight, head.bias, _config_value(model, "final_logit_softcapping"),
                   scale)

    def _post(self, z: Tensor) -> Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, hidden: Tensor, vocab: Optional[Tensor] = None) -> Tensor:
        """float32 logits of ``hidden`` (…, d), over the rows ``vocab`` only when given."""
        weight, bias = self.weight, self.bias
        if vocab is not None:
            rows = vocab.to(weight.device)
            weight = weight[rows]
            bias = bias[rows] if bias is not None else None
        return self._post(torch.nn.functional.linear(hidden, weight, bias).float())

    def token_nll(self, hidden: Tensor, targets: Tensor, chunk: Optional[int] = None) -> Tensor:
        """``−log softmax(logits(hidden))[target]`` per row, float32: ``hidden`` (R, d),
        ``targets`` (R,). Differentiable with respect to ``hidden`` (the head's parameters
        must be frozen). ``chunk``: vocabulary rows per step (default: sized to the cache on
        CPU, 64k on an accelerator)."""
        if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
            raise ValueError(f"token_nll wants hidden (R, d) and targets (R,), got "
                             f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise ValueError("token_nll does not train the LM head: freeze its parameters")
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0, dtype=torch.float32)
        chunk = chunk or default_chunk(hidden.shape[0], hidden.device)
        return _ChunkedNLL.apply(hidden, targets.to(hidden.device), self, int(chunk))


    @torch.no_grad()
    def kl_and_nll(self, steered: Tensor, base: Tensor, targets: Tensor,
                   chunk: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per position (R,), float32: the token NLL under the steered and the base hidden
        states and KL(steered ‖ base) of the next-token distributions, in one pass over the
        vocabulary (two head matmuls per chunk, no (R × V) tensor kept).

        With running max m of the steered logits z and base logits y::

            KL = Σ_v p_v (z_v − y_v) − lse(z) + lse(y),   Σ_v p_v (z_v − y_v) = A / S,
            S = Σ_v e^{z_v − m},  A = Σ_v e^{z_v − m} (z_v − y_v)    (both rescaled as m grows)
        """
        if steered.shape != base.shape or steered.dim() != 2 or targets.shape != steered.shape[:1]:
            raise ValueError(f"kl_and_nll wants steered and base (R, d) and targets (R,), got "
                             f"{tuple(steered.shape)}, {tuple(base.shape)}, "
                             f"{tuple(targets.shape)}")
        rows = steered.shape[0]
        chunk = chunk or default_chunk(2 * rows, steered.device)
        targets = targets.to(steered.device)

        def zeros():
            return steered.new_zeros(rows, dtype=torch.float32)

        m_z = steered.new_full((rows,), float("-inf"), dtype=torch.float32)
        m_y = m_z.clone()
        s_z, s_y, a_zy, t_z, t_y = zeros(), zeros(), zeros(), zeros(), zeros()
        for (start, raw_z), (_, raw_y) in zip(_chunks(self, steered, chunk),
                                              _chunks(self, base, chunk)):
            z, y = self._post(raw_z), self._post(raw_y)
            new_z, new_y = torch.maximum(m_z, z.amax(-1)), torch.maximum(m_y, y.amax(-1))
            shrink = (m_z - new_z).exp()
            e_z = (z - new_z[:, None]).exp_()
            s_z = s_z * shrink + e_z.sum(-1)
            a_zy = a_zy * shrink + (e_z * (z - y)).sum(-1)
            s_y = s_y * (m_y - new_y).exp() + (y - new_y[:, None]).exp_().sum(-1)
            m_z, m_y = new_z, new_y
            inside = (targets >= start) & (targets < start + z.shape[1])
            local = (targets - start).clamp(0, z.shape[1] - 1)[:, None]
            t_z = torch.where(inside, z.gather(-1, local).squeeze(-1), t_z)
            t_y = torch.where(inside, y.gather(-1, local).squeeze(-1), t_y)
        lse_z, lse_y = m_z + s_z.log(), m_y + s_y.log()
        kl = (a_zy / s_z - lse_z + lse_y).clamp(min=0)
        return lse_z - t_z, lse_y - t_y, kl


    @torch.no_grad()
    def step_masses(self, hidden: Tensor, set_mask: Tensor, chunk: Optional[int] = None,
                    banned: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """One greedy step from the final hidden states ``hidden`` (B, d): the softmax mass of
        each token set, ``(B, K)`` float32 with ``set_mask`` (V, K) of 0/1, and the argmax
        token (B,) (the first of tied maxima, as ``argmax``), without a (B × V) tensor.
        ``banned`` (rows, ids): pairs the argmax may not pick (as if their logits were −inf;
        the masses stay the model's own distribution)."""
        rows = hidden.shape[0]
        hidden = hidden.to(self.weight.device).contiguous()
        set_mask = set_mask.to(hidden.device, torch.float32)
        chunk = chunk or default_chunk(rows, hidden.device)
        running_max = hidden.new_full((rows,), float("-inf"), dtype=torch.float32)
        total = hidden.new_zeros(rows, dtype=torch.float32)
        in_sets = hidden.new_zeros((rows, set_mask.shape[1]), dtype=torch.float32)
        best = torch.zeros(rows, dtype=torch.long, device=hidden.device)
        best_logit = running_max.clone()
        for start, raw in _chunks(self, hidden, chunk):
            z = self._post(raw)
            new_max = torch.maximum(running_max, z.amax(-1))
            shrink = (running_max - new_max).exp()
            weights = (z - new_max[:, None]).exp()
            total = total * shrink + weights.sum(-1)
            in_sets = in_sets * shrink[:, None] + weights @ set_mask[start:start + z.shape[1]]
            running_max = new_max
            if banned is not None:
                inside = (banned[1] >= start) & (banned[1] < start + z.shape[1])
                z[banned[0][inside], banned[1][inside] - start] = float("-inf")
            chunk_best, chunk_arg = z.max(-1)
            better = chunk_best > best_logit  # strict: an earlier maximum wins a tie
            best = torch.where(better, chunk_arg + start, best)
            best_logit = torch.where(better, chunk_best, best_logit)
        return in_sets / total[:, None], best


class HeadBypass:
    """Within ``with HeadBypass(model) as bypass:``, the model's LM head only records its input
    (``bypass.hidden``: the last call's (B, L, d) final hidden states) and returns zeros of
    shape (B, L, 1), so that a caller scores the vocabulary itself (:meth:`OutputHead.
    step_masses`) while every hook on the model still runs as in a normal forward."""

    @staticmethod
    def applies(model) -> bool:
        """Whether the head is a plain ``Linear`` that nothing hooks or patches (a hook on it,
        e.g. a logit bias, would be skipped by the bypass), apart from hooks marked
        ``layout_only`` (the loader's contiguous-input pre-hook)."""
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or "forward" in vars(head):
            return False
        from torch.nn.modules import module as torch_module
        hooks = [*head._forward_hooks.values(), *head._backward_hooks.values(),
                 *torch_module._global_forward_hooks.values(),
                 *torch_module._global_forward_pre_hooks.values(),
                 *(h for h in head._forward_pre_hooks.values()
                   if not getattr(h, "layout_only", False))]
        return not hooks

    def __init__(self, model):
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head), None)
        if not name:
            raise TypeError(f"{type(model).__name__}'s LM head is not one of its submodules")
        parent, _, self.attribute = name.rpartition(".")
        self.parent = model.get_submodule(parent) if parent else model
        self.head, self.hidden = head, None

    def __enter__(self) -> "HeadBypass":
        setattr(self.parent, self.attribute, _RecordInput(self))
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.parent, self.attribute, self.head)


class _RecordInput(torch.nn.Module):
    """The stand-in head of :class:`HeadBypass`."""

    def __init__(self, bypass: HeadBypass):
        super().__init__()
        self.bypass = [bypass]  # a list: not registered as a submodule

    def forward(self, hidden: Tensor) -> Tensor:
        self.bypass[0].hidden = hidden
        return hidden.new_zeros(*hidden.shape[:-1], 1)


def default_chunk(rows: int, device: torch.device) -> int:
    """Vocabulary rows per step: about 400k float32 logits (1.6 MB, L2-sized) on CPU, where
    1k–4k rows measured fastest for 48–400 positions; 64k on an accelerator."""
    if device.type != "cpu":
        return 65536
    size = 1024
    while size < 16384 and rows * size * 2 <= 400_000:
        size *= 2
    return size


def _chunks(head: OutputHead, hidden: Tensor, chunk: int):
    """(first vocabulary row, raw chunk logits before ``post``) over the whole vocabulary."""
    vocab = head.weight.shape[0]
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        bias = head.bias[start:stop] if head.bias is not None else None
        yield start, torch.nn.functional.linear(hidden, head.weight[start:stop], bias).float()


class _ChunkedNLL(torch.autograd.Function):
    """NLL = logsumexp(z) − z[target] with z = post(h Wᵀ + b), the vocabulary in chunks."""

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, head: OutputHead, chunk: int) -> Tensor:
        rows = hidden.shape[0]
        running_max = hidden.new_full((rows,), float("-inf"), dtype=torch.float32)
        running_sum = hidden.new_zeros(rows, dtype=torch.float32)
        target_logit = hidden.new_zeros(rows, dtype=torch.float32)
        for start, raw in _chunks(head, hidden, chunk):
            z = head._post(raw)
            new_max = torch.maximum(running_max, z.amax(-1))
            running_sum = running_sum * (running_max - new_max).exp() \
                + (z - new_max[:, None]).exp_().sum(-1)
            running_max = new_max
            inside = (targets >= start) & (targets < start + z.shape[1])
            local = (targets - start).clamp(0, z.shape[1] - 1)
            target_logit = torch.where(inside, z.gather(-1, local[:, None]).squeeze(-1),
                                       target_logit)
        lse = running_max + running_sum.log()
        ctx.save_for_backward(hidden, targets, lse)
        ctx.head, ctx.chunk = head, chunk
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        hidden, targets, lse = ctx.saved_tensors
        head, chunk = ctx.head, ctx.chunk
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        g = grad_nll.float()
        for start, raw in _chunks(head, hidden, chunk):
            z = head._post(raw)
            dz = (z - lse[:, None]).exp_()  # softmax of the chunk
            inside = (targets >= start) & (targets < start + z.shape[1])
            local = (targets - start).clamp(0, z.shape[1] - 1)
            dz.scatter_add_(-1, local[:, None], -inside.float()[:, None])
            dz.mul_(g[:, None])
            # back through post: soft-cap (d/dx c·tanh(x/c) = 1 − tanh²) then scale
            if head.softcap:
                capped = torch.tanh(raw * head.scale / head.softcap)
                dz.mul_(1 - capped * capped)
            if head.scale != 1.0:
                dz.mul_(head.scale)
            grad_hidden += dz.to(hidden.dtype) @ head.weight[start:start + z.shape[1]]
        return grad_hidden.to(hidden.dtype), None, None, None
