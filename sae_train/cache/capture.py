"""Capture activations at many sites in one forward pass, stopping after the deepest layer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from sae_train.models.sites import Site, decoder_layers, first_tensor, site_module


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once every requested site has fired."""


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 at each row's first real token (needed for absolute-position
    models such as GPT-2; rotary models get the same relative offsets either way)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def capture_sites(model: nn.Module, sites: list[Site], stop_early: bool = True):
    """Hook every site; yields a dict that each forward fills with ``site name → (b, s, w)``.

    With ``stop_early`` the forward raises internally after the deepest requested layer so the
    remaining layers and the LM head are never run; use :func:`run_capture` to call the model.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def output_hook(name):
        def hook(_module, _inputs, output):
            store[name] = first_tensor(output).detach()
        return hook

    def input_hook(name):
        def hook(_module, inputs):
            store[name] = first_tensor(inputs).detach()
        return hook

    try:
        for site in sites:
            module, where = site_module(model, site)
            if where == "output":
                handles.append(module.register_forward_hook(output_hook(site.name)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(site.name)))
        if stop_early:
            deepest = decoder_layers(model)[max(s.layer for s in sites)]

            def stop(_module, _inputs, _output):
                raise _StopForward

            # Registered last, so it runs after the site hooks on the same layer.
            handles.append(deepest.register_forward_hook(stop))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def run_capture(model: nn.Module, store: dict, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward through ``model`` with hooks from :func:`capture_sites` active."""
    store.clear()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=left_padded_position_ids(attention_mask), use_cache=False)
    except _StopForward:
        pass
    return dict(store)
