"""Site names → modules: one resolver for every supported architecture.

A *site* is a named place in the model whose activations we cache, encode with an SAE or steer:

- ``layers.{i}.resid``   output of decoder layer *i* (the residual stream after the block)
- ``layers.{i}.mlp``     MLP neuron activations: the *input* of the down projection
                         (``act(gate(x)) * up(x)`` for gated MLPs, ``act(c_fc(x))`` for GPT-2)
- ``layers.{i}.mlp_out`` output of the MLP module (before any post-MLP norm, e.g. Gemma's
                         ``post_feedforward_layernorm``)

Patterns expand to several sites: ``layers.*.resid``, ``layers.3-6.mlp`` (inclusive range),
``layers.0,6,12.resid``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

SITE_KINDS = ("resid", "mlp", "mlp_out")


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where the pieces live in one family of HF causal LMs."""

    layers: tuple[str, ...]  # candidate attribute paths of the decoder-layer ModuleList
    mlp: str  # attribute of a decoder layer holding the MLP
    down_proj: str  # attribute of the MLP whose *input* is the neuron activation vector
    hidden_attr: str = "hidden_size"
    intermediate_attr: str = "intermediate_size"


_GATED = ArchitectureLayout(
    layers=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    mlp="mlp",
    down_proj="down_proj",
)
_GPT2 = ArchitectureLayout(
    layers=("transformer.h",), mlp="mlp", down_proj="c_proj", hidden_attr="n_embd",
    intermediate_attr="n_inner",
)

# model_type (from the HF config) → layout. Llama-style gated MLPs share one layout.
ARCHITECTURES: dict[str, ArchitectureLayout] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3": _GATED,
    "gemma3_text": _GATED,
    "gpt2": _GPT2,
}


class SiteError(ValueError):
    """A site name that does not exist in the model, or an unsupported architecture."""


def _get_attr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def architecture_layout(model: nn.Module) -> ArchitectureLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SiteError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"model_type values: {', '.join(sorted(ARCHITECTURES))}. Add an ArchitectureLayout "
            "to sae_train.models.sites.ARCHITECTURES to support it."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a supported HF causal LM."""
    layout = architecture_layout(model)
    for path in layout.layers:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise SiteError(
        f"could not find the decoder layers of {type(model).__name__} at any of {layout.layers}"
    )


def text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class Site:
    """A resolved site: its name, layer index, kind and activation width."""

    name: str
    layer: int
    kind: str
    width: int


def parse_site(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"layers\.(\d+)\.(resid|mlp|mlp_out)", name)
    if not match:
        raise SiteError(
            f"site {name!r} is not a valid site name; expected layers.<i>.<kind> with kind one of "
            f"{', '.join(SITE_KINDS)} (patterns: layers.*.resid, layers.3-6.mlp, layers.0,6.resid)"
        )
    return int(match.group(1)), match.group(2)


def site_width(model: nn.Module, kind: str) -> int:
    layout = architecture_layout(model)
    cfg = text_config(model)
    hidden = getattr(cfg, layout.hidden_attr)
    if kind in ("resid", "mlp_out"):
        return int(hidden)
    inter = getattr(cfg, layout.intermediate_attr, None)
    return int(inter if inter is not None else 4 * hidden)  # GPT-2: n_inner None means 4·d


def expand_site_patterns(patterns: str | list[str], n_layers: int) -> list[str]:
    """Expand ``layers.*.resid``-style patterns to concrete names, in layer-then-kind order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        match = re.fullmatch(r"layers\.([^.]+)\.(resid|mlp|mlp_out)", pattern)
        if not match:
            parse_site(pattern)  # raises with the explanation
        spec, kind = match.group(1), match.group(2)
        if spec == "*":
            layers = list(range(n_layers))
        elif re.fullmatch(r"\d+-\d+", spec):
            lo, hi = map(int, spec.split("-"))
            layers = list(range(lo, hi + 1))
        elif re.fullmatch(r"\d+(,\d+)*", spec):
            layers = [int(x) for x in spec.split(",")]
        else:
            raise SiteError(f"site pattern {pattern!r}: layer part {spec!r} is not *, i, i-j or i,j,k")
        for layer in layers:
            name = f"layers.{layer}.{kind}"
            if name not in out:
                out.append(name)
    return out


def resolve_sites(model: nn.Module, patterns: str | list[str]) -> list[Site]:
    """Resolve site names/patterns against a model; unknown names fail listing what exists."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    names = expand_site_patterns(patterns, n_layers)
    if not names:
        raise SiteError("no sites requested")
    sites = []
    for name in names:
        layer, kind = parse_site(name)
        if layer >= n_layers:
            raise SiteError(
                f"site {name!r} does not exist: the model has {n_layers} layers "
                f"(0–{n_layers - 1}); sites are layers.<0–{n_layers - 1}>.<{'|'.join(SITE_KINDS)}>"
            )
        sites.append(Site(name, layer, kind, site_width(model, kind)))
    return sites


def site_module(model: nn.Module, site: Site | str) -> tuple[nn.Module, str]:
    """The module to hook for a site and how: ("output" → forward hook, "input" → pre-hook)."""
    if isinstance(site, str):
        (site,) = resolve_sites(model, site)
    layout = architecture_layout(model)
    layer = decoder_layers(model)[site.layer]
    if site.kind == "resid":
        return layer, "output"
    mlp = getattr(layer, layout.mlp)
    if site.kind == "mlp_out":
        return mlp, "output"
    return getattr(mlp, layout.down_proj), "input"


def first_tensor(x):
    """Decoder layers return a tensor (transformers ≥5) or a tuple whose first item is it."""
    return x[0] if isinstance(x, (tuple, list)) else x
