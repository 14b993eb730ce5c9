"""Which latents are dead: not fired in the last ``dead_after_tokens`` training tokens (AuxK)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DeadLatentTracker(nn.Module):
    """Counts, per latent, the tokens since it last fired; its buffer is checkpointed.

    Under DDP the caller passes the *global* fired mask and token count (reduced over ranks), so
    every rank holds the same counters and the same dead mask.
    """

    def __init__(self, n_latents: int, dead_after_tokens: int):
        super().__init__()
        if dead_after_tokens <= 0:
            raise ValueError("metrics.dead_after_tokens must be positive")
        self.dead_after_tokens = int(dead_after_tokens)
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))

    @torch.no_grad()
    def update(self, fired: Tensor, n_tokens: int) -> None:
        """``fired``: (n_latents,) bool, latents that fired at least once in these tokens."""
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired[fired] = 0

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens
