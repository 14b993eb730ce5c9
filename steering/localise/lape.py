"""LAPE language neurons (Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual
Capabilities in Large Language Models"): a baseline for, and a cross-check of, neuron tracing.

For MLP neuron n of layer ℓ (the ``layers.{ℓ}.mlp`` site: the input of the down projection)
and language L, the activation probability is ``p_{n,L} = P(a_n > 0 | token of L)`` over the
tokens of L's texts (special tokens and padding excluded). Then, as in the paper's code:

1. ``p̃_{n,·} = p_{n,·} / Σ_L p_{n,L}``; entropy ``H_n = −Σ_L p̃ log p̃`` (0·log 0 = 0).
2. ``τ`` = the ``prob_quantile`` quantile of all p (k-th smallest, k = round(q·count)).
   Neurons whose p exceeds τ in no language are dropped (their entropy is not "low", it is
   undefined for all-zero rows), unlike the original code, which could still pick them when
   fewer than the quota survive.
3. Of the survivors, the ``round(entropy_quantile × all neurons)`` with the lowest entropy,
   counted over all layers together, are language-specific (ties broken by layer, then index).
4. Each selected neuron belongs to every language L with ``p_{n,L} > τ`` (so a neuron can be
   specific to a small group of languages, e.g. es and en).

"Active" (``active="value"``, the default and the only choice from a cache): the neuron value
itself is > 0. For gated MLPs (Llama, Gemma: ``act(gate(x)) · up(x)``) this is
``sign(act(gate)) = sign(up)``, not Tang et al.'s criterion ``act(gate(x)) > 0`` (⇔ gate > 0 for
SiLU/GELU); it is the quantity the cache stores and the sign with which the neuron writes its
down-projection column. ``active="gate"`` (model path only) reproduces the paper: it hooks the
activation function's output. For GPT-2 (``act(c_fc(x))``) both are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sae_train.models.sites import (architecture_layout, decoder_layers, first_tensor,
                                    resolve_sites, site_module)
from steering.language.defaultness import pad_token_id

log = logging.getLogger(__name__)
ACTIVE_CRITERIA = ("value", "gate")


@dataclass
class LanguageActivationProbs:
    """``probs[i, n, k]`` = P(neuron n of layer ``layers[i]`` > 0 | language ``languages[k]``)."""

    probs: torch.Tensor  # (layers, neurons, langs) float32
    layers: list[int]
    languages: list[str]
    n_tokens: dict[str, int]
    active: str = "value"
    source: dict = field(default_factory=dict)

    def lape_neurons(self, entropy_quantile: float = 0.01, prob_quantile: float = 0.95
                     ) -> dict[str, dict[int, torch.Tensor]]:
        return lape_neurons(self.probs, self.languages, layers=self.layers,
                            entropy_quantile=entropy_quantile, prob_quantile=prob_quantile)

    def save(self, path: str | Path) -> None:
        """safetensors with the fields as json metadata (written atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"layers": self.layers, "languages": self.languages, "n_tokens": self.n_tokens,
                "active": self.active, "source": self.source}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"probs": self.probs.contiguous()}, str(tmp),
                  metadata={"lape": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "LanguageActivationProbs":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["lape"])
            probs = f.get_tensor("probs")
        return cls(probs, [int(l) for l in meta["layers"]], list(meta["languages"]),
                   {k: int(v) for k, v in meta["n_tokens"].items()}, meta["active"],
                   meta["source"])


def stored_activation_probabilities(store_dir: str | Path | None, key: dict,
                                    compute: Callable[[], LanguageActivationProbs]
                                    ) -> tuple[LanguageActivationProbs, bool]:
    """``compute()``'s result, kept in ``store_dir/lape-<hash of key>.safetensors``.

    The probabilities cover every language of the corpus, so each target's localisation
    would compute the very same numbers (the demo's second target saves its LAPE pass). The
    key names every input (model weights, tokenizer, texts, layers, settings). An unwritable
    ``store_dir`` (a shared, read-only cache) only costs the recomputation. Returns
    (probabilities, whether they were read from the store)."""
    if store_dir is None:
        return compute(), False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(store_dir) / f"lape-{digest[:20]}.safetensors"
    if path.is_file():
        try:
            probs = LanguageActivationProbs.load(path)
            log.info("LAPE activation probabilities: reused %s", path)
            return probs, True
        except Exception as err:  # a torn or foreign file: recompute and overwrite
            log.warning("could not read %s (%s); recomputing", path, err)
    probs = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probs.save(path)
    except OSError as err:
        log.info("LAPE activation probabilities not stored (%s)", err)
    return probs, False


def _kth_quantile(values: torch.Tensor, q: float) -> float:
    flat = values.reshape(-1).float()
    k = min(max(1, round(flat.numel() * q)), flat.numel())
    return float(flat.kthvalue(k).values)


def language_entropy(activation_probs: torch.Tensor) -> torch.Tensor:
    """Entropy over languages of the normalised activation probabilities, (layers, neurons);
    NaN where a neuron never fires in any language."""
    total = activation_probs.sum(-1, keepdim=True)
    normed = activation_probs / total
    logs = torch.where(normed > 0, normed.log(), torch.zeros_like(normed))
    entropy = -(normed * logs).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy, torch.full_like(entropy, float("nan")))


def lape_neurons(activation_probs: torch.Tensor, languages: Sequence[str],
                 layers: Sequence[int] | None = None, entropy_quantile: float = 0.01,
                 prob_quantile: float = 0.95) -> dict[str, dict[int, torch.Tensor]]:
    """Language-specific neurons by LAPE (rule in the module docstring).

    ``activation_probs``: (layers, neurons, langs) in [0, 1]. ``layers``: the layer index of
    each row (default 0, 1, …). Returns ``{lang: {layer: sorted LongTensor of neurons}}`` with
    every layer present (empty tensors where none).
    """
    probs = activation_probs.detach().float().cpu()
    if probs.ndim != 3 or probs.shape[-1] != len(languages):
        raise ValueError(f"activation_probs must be (layers, neurons, {len(languages)} languages)"
                         f"; got shape {tuple(probs.shape)} for languages {list(languages)}")
    if len(languages) < 2:
        raise ValueError("LAPE needs at least two languages: entropy over one is always 0")
    if not (0 < entropy_quantile < 1 and 0 < prob_quantile < 1):
        raise ValueError(f"entropy_quantile and prob_quantile must be in (0, 1); got "
                         f"{entropy_quantile}, {prob_quantile}")
    layers = list(range(probs.shape[0])) if layers is None else list(layers)
    if len(layers) != probs.shape[0]:
        raise ValueError(f"{len(layers)} layer indices for {probs.shape[0]} rows of probabilities")
    n_layers, n_neurons, _ = probs.shape
    threshold = _kth_quantile(probs, prob_quantile)
    entropy = language_entropy(probs)
    survives = (probs > threshold).any(-1) & ~entropy.isnan()
    quota = round(n_layers * n_neurons * entropy_quantile)
    flat_entropy = torch.where(survives, entropy, torch.full_like(entropy, float("inf")))
    order = torch.sort(flat_entropy.reshape(-1), stable=True).indices
    chosen = order[: min(quota, int(survives.sum()))]
    layer_of, neuron_of = chosen // n_neurons, chosen % n_neurons
    member = probs[layer_of, neuron_of] > threshold  # (chosen, langs)
    log.info("LAPE: τ=%.4f (q=%.3f), %d of %d neurons survive the τ filter, %d selected",
             threshold, prob_quantile, int(survives.sum()), n_layers * n_neurons, len(chosen))
    out: dict[str, dict[int, torch.Tensor]] = {}
    for k, lang in enumerate(languages):
        per_layer = {}
        for row, layer in enumerate(layers):
            pick = member[:, k] & (layer_of == row)
            per_layer[layer] = torch.sort(neuron_of[pick]).values.long()
        out[lang] = per_layer
    return out


# --------------------------------------------------------------------------- from a cache
def activation_probabilities_from_cache(cache, layers: Sequence[int] | None = None,
                                        languages: Sequence[str] | None = None,
                                        splits: Sequence[str] | None = ("discovery",),
                                        chunk_tokens: int = 16384) -> LanguageActivationProbs:
    """Activation probabilities from the ``layers.{i}.mlp`` sites of an ``ActivationCache``.

    Streams ``chunk_tokens`` rows at a time per site. ``layers`` defaults to every cached
    ``mlp`` site, ``languages`` to the cache's, ``splits`` to the discovery split (None: all).
    """
    available = sorted(int(name.split(".")[1]) for name, s in cache.sites.items()
                       if s["kind"] == "mlp")
    layers = available if layers is None else list(layers)
    missing = [l for l in layers if l not in available]
    if missing or not layers:
        raise ValueError(f"the cache at {cache.path} has no MLP-neuron site for layer(s) "
                         f"{missing or layers}; it has layers.{{{','.join(map(str, available))}}}"
                         ".mlp. Re-cache with sites layers.*.mlp")
    languages = list(cache.languages if languages is None else languages)
    splits = None if splits is None else list(splits)
    indices = cache.select(splits=splits, languages=languages)
    lookup = np.full(len(cache.languages), -1, dtype=np.int64)  # cache code → our column
    lookup[[cache.languages.index(lang) for lang in languages]] = np.arange(len(languages))
    lang_of_row = torch.from_numpy(lookup[cache.metadata["language"][indices].astype(np.int64)])
    n_tokens = torch.bincount(lang_of_row, minlength=len(languages))
    empty = [lang for lang, n in zip(languages, n_tokens.tolist()) if n == 0]
    if empty:
        raise ValueError(f"the cache at {cache.path} has no tokens of {empty} in splits "
                         f"{splits or 'any'}; it has languages {cache.languages}")
    probs = []
    for layer in layers:
        site = f"layers.{layer}.mlp"
        counts = torch.zeros(len(languages), cache.width(site), dtype=torch.float64)
        for start in range(0, len(indices), chunk_tokens):
            rows = cache.gather(site, indices[start:start + chunk_tokens])
            onehot = torch.nn.functional.one_hot(lang_of_row[start:start + chunk_tokens],
                                                 len(languages)).float()
            counts += (onehot.T @ (rows > 0).float()).double()  # exact: ≤ chunk per entry
        probs.append((counts / n_tokens[:, None].double()).T.float())
    return LanguageActivationProbs(
        torch.stack(probs), layers, languages,
        {lang: int(n) for lang, n in zip(languages, n_tokens.tolist())}, active="value",
        source={"cache": str(cache.path), "splits": splits},
    )


# --------------------------------------------------------------------------- from a model
class _StopForward(Exception):
    pass


def _windows(ids: list[int], special: set[int], max_length: int) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens, each keeping the leading special tokens."""
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    step = max_length - lead
    if step <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for text tokens")
    body = ids[lead:]
    return [ids[:lead] + body[i:i + step] for i in range(0, len(body), step)] or [ids]


@contextmanager
def _count_active(model, layers: list[int], active: str, counts: torch.Tensor, state: dict):
    """Hooks that add ``(activation > 0) & keep`` per neuron into ``counts[row, lang]``."""
    handles = []

    def add(row: int, activation: torch.Tensor) -> None:
        keep = state["keep"]
        hits = ((activation > 0) & keep[..., None]).sum((0, 1))
        counts[row, state["lang"]] += hits.to(counts.device, torch.float64)

    try:
        for row, layer in enumerate(layers):
            if active == "gate" and model.config.model_type != "gpt2":
                mlp = getattr(decoder_layers(model)[layer], architecture_layout(model).mlp)
                act = getattr(mlp, "act_fn", None)
                if not isinstance(act, torch.nn.Module):
                    raise ValueError(f"active='gate' needs an act_fn module on the MLP of "
                                     f"{type(model).__name__}; use active='value'")
                handles.append(act.register_forward_hook(
                    lambda _m, _i, out, row=row: add(row, first_tensor(out))))
            else:
                module, _ = site_module(model, f"layers.{layer}.mlp")
                handles.append(module.register_forward_pre_hook(
                    lambda _m, inputs, row=row: add(row, first_tensor(inputs))))

        def stop(_module, _inputs, _output):
            raise _StopForward

        handles.append(decoder_layers(model)[max(layers)].register_forward_hook(stop))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def activation_probabilities_from_model(model, tokenizer, texts_by_lang: dict[str, Sequence[str]],
                                        layers: Sequence[int] | None = None,
                                        batch_size: int = 16, max_length: int = 128,
                                        active: str = "value") -> LanguageActivationProbs:
    """Activation probabilities by running the model with hooks on each layer's MLP.

    Texts are tokenised with special tokens (BOS), split into windows of ``max_length`` like
    the cache writer, left-padded per language; special tokens and padding are not counted.
    The forward stops after the deepest requested layer.
    """
    if active not in ACTIVE_CRITERIA:
        raise ValueError(f"active={active!r}; choose one of {ACTIVE_CRITERIA}")
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    sites = resolve_sites(model, [f"layers.{l}.mlp" for l in layers])  # validates the layers
    languages = list(texts_by_lang)
    if not languages:
        raise ValueError("texts_by_lang is empty")
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    pad_id = pad_token_id(tokenizer)
    counts = torch.zeros(len(layers), len(languages), sites[0].width, dtype=torch.float64)
    n_tokens = torch.zeros(len(languages), dtype=torch.long)
    state: dict = {}
    with _count_active(model, layers, active, counts, state):
        for k, lang in enumerate(languages):
            encoded = tokenizer(list(texts_by_lang[lang]), add_special_tokens=True)["input_ids"]
            windows = [w for ids in encoded for w in _windows(list(ids), special, max_length)]
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size]
                length = max(len(w) for w in batch)
                ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), length), dtype=torch.long)
                for row, w in enumerate(batch):
                    ids[row, length - len(w):] = torch.tensor(w)
                    attn[row, length - len(w):] = 1
                keep = attn.bool() & ~torch.isin(ids, torch.tensor(sorted(special) or [-1]))
                state.update(lang=k, keep=keep.to(device))
                n_tokens[k] += int(keep.sum())
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device),
                          position_ids=(attn.cumsum(-1) - 1).clamp(min=0).to(device),
                          use_cache=False)
                except _StopForward:
                    pass
    empty = [lang for lang, n in zip(languages, n_tokens.tolist()) if n == 0]
    if empty:
        raise ValueError(f"no text tokens for language(s) {empty}")
    probs = (counts / n_tokens[None, :, None].double()).permute(0, 2, 1).float()
    return LanguageActivationProbs(
        probs.contiguous(), layers, languages,
        {lang: int(n) for lang, n in zip(languages, n_tokens.tolist())}, active=active,
        source={"model": getattr(model.config, "_name_or_path", type(model).__name__)},
    )
