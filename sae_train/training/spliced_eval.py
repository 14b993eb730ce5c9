"""CE loss recovered and KL with an SAE spliced into the real model, on held-out text.

For a site, three forwards of the same batch: clean, with the site's activations replaced by the
SAE reconstruction ("spliced"), and with them zeroed ("ablated"). Then

    CE recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)   (1 = as good as clean)
    KL           = E_tokens KL(p_clean ‖ p_spliced)

Only the tokens the cache stores (not BOS / pad / other special tokens) are replaced, since the
SAE never saw the others.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_train.cache.capture import left_padded_position_ids
from sae_train.models.sites import first_tensor, site_module

log = logging.getLogger(__name__)

Replacement = Callable[[Tensor], Tensor]


@contextmanager
def splice_site(model: nn.Module, site: str, replace: Replacement, keep: Tensor) -> Iterator[None]:
    """Within the block, activations at ``site`` for positions ``keep`` (batch, seq) bool are
    replaced by ``replace(rows)`` (rows: (n, width)); other positions pass through."""
    module, where = site_module(model, site)

    def swap(hidden: Tensor) -> Tensor:
        hidden = hidden.clone()
        rows = hidden[keep]
        hidden[keep] = replace(rows).to(hidden.dtype)
        return hidden

    if where == "output":
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                return (swap(output[0]), *output[1:])
            return swap(output)
        handle = module.register_forward_hook(hook)
    else:
        def pre_hook(_module, inputs):
            return (swap(first_tensor(inputs)), *inputs[1:])
        handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class SplicedLMEvaluator:
    """Held-out ``texts`` tokenised once into left-padded batches for repeated evaluation."""

    def __init__(self, model: nn.Module, tokenizer, texts: list[str], batch_size: int = 8,
                 max_length: int = 128):
        if not texts:
            raise ValueError("no held-out texts for the spliced evaluation")
        self.model = model
        self.device = next(model.parameters()).device
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.batches = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            ids, attn = enc["input_ids"], enc["attention_mask"]
            keep = attn.bool() & ~torch.isin(ids, special)
            # position t predicts token t+1; score targets that are real, non-special tokens
            target_ok = keep[:, 1:]
            self.batches.append((ids, attn, keep, target_ok))

    def _logits(self, ids: Tensor, attn: Tensor) -> Tensor:
        ids, attn = ids.to(self.device), attn.to(self.device)
        out = self.model(input_ids=ids, attention_mask=attn,
                         position_ids=left_padded_position_ids(attn), use_cache=False)
        return out.logits[:, :-1].float()

    @torch.no_grad()
    def evaluate(self, replacements: dict[str, Replacement]) -> dict[str, dict[str, float]]:
        """site → {ce_clean, ce_spliced, ce_ablated, ce_loss_recovered, kl}."""
        sums = {site: {"spliced": 0.0, "ablated": 0.0, "kl": 0.0} for site in replacements}
        clean_sum, n_targets = 0.0, 0
        for ids, attn, keep, target_ok in self.batches:
            targets = ids[:, 1:].to(self.device)
            mask = target_ok.to(self.device)
            clean = self._logits(ids, attn)
            clean_logp = clean.log_softmax(-1)
            clean_sum += float(_ce_sum(clean, targets, mask))
            n_targets += int(mask.sum())
            keep_dev = keep.to(self.device)
            for site, replace in replacements.items():
                with splice_site(self.model, site, replace, keep_dev):
                    spliced = self._logits(ids, attn)
                with splice_site(self.model, site, torch.zeros_like, keep_dev):
                    ablated = self._logits(ids, attn)
                sums[site]["spliced"] += float(_ce_sum(spliced, targets, mask))
                sums[site]["ablated"] += float(_ce_sum(ablated, targets, mask))
                kl = (clean_logp.exp() * (clean_logp - spliced.log_softmax(-1))).sum(-1)
                sums[site]["kl"] += float(kl[mask].sum())
        n = max(n_targets, 1)
        ce_clean = clean_sum / n
        results = {}
        for site, s in sums.items():
            ce_spliced, ce_ablated = s["spliced"] / n, s["ablated"] / n
            gap = ce_ablated - ce_clean
            results[site] = {
                "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_ablated": ce_ablated,
                "ce_loss_recovered": (ce_ablated - ce_spliced) / gap if abs(gap) > 1e-9
                else float("nan"),
                "kl": s["kl"] / n}
        return results


def _ce_sum(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ce[mask].sum()


def sae_replacement(sae: nn.Module) -> Replacement:
    """The SAE's reconstruction of raw activations (inference behaviour, no gradients)."""
    device = next(sae.parameters()).device

    def replace(rows: Tensor) -> Tensor:
        return sae(rows.to(device, torch.float32)).reconstruction.to(rows.device)
    return replace


class SplicedEvalCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 logs ``eval/<site>/{ce_loss_recovered,
    kl, ce_spliced, ce_clean}``. The model and texts are loaded on first use."""

    def __init__(self, cache, every_n_steps: int, splits: list[str], max_documents: int = 64,
                 batch_size: int = 8, max_length: int = 128, model_name: Optional[str] = None,
                 model_dtype: str = "float32", device: str = "auto"):
        if every_n_steps <= 0:
            raise ValueError("eval.every_n_steps must be positive")
        self.cache = cache
        self.every_n_steps = every_n_steps
        self.splits, self.max_documents = list(splits), max_documents
        self.batch_size, self.max_length = batch_size, max_length
        self.model_name, self.model_dtype, self.device = model_name, model_dtype, device
        self.evaluator: Optional[SplicedLMEvaluator] = None
        self.history: list[dict] = []

    def _build(self) -> SplicedLMEvaluator:
        from sae_train.config import ModelConfig
        from sae_train.models.loading import load_model

        recorded = self.cache.manifest.get("config", {}).get("provenance", {}).get("model", {})
        name = self.model_name or recorded.get("name")
        if not name:
            raise ValueError(f"the cache at {self.cache.path} does not record its model; set "
                             "eval.model_name")
        model, tokenizer, info = load_model(ModelConfig(name=name, slug="eval",
                                                        dtype=self.model_dtype,
                                                        device=self.device))
        if recorded.get("fingerprint") and info.fingerprint != recorded["fingerprint"] \
                and self.model_name is None:
            raise ValueError(f"model {name!r} now has weights fingerprint {info.fingerprint}, but "
                             f"the cache was made with {recorded['fingerprint']}; the spliced "
                             "evaluation would be meaningless (re-create the cache)")
        docs = [d for d in self.cache.documents if d["split"] in self.splits]
        if not docs:
            raise ValueError(f"no documents of splits {self.splits} in {self.cache.path}; set "
                             "eval.splits")
        texts = [d["text"] for d in docs[:self.max_documents]]
        log.info("spliced evaluation: %s on %d held-out documents", name, len(texts))
        return SplicedLMEvaluator(model, tokenizer, texts, self.batch_size, self.max_length)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        if self.evaluator is None:
            self.evaluator = self._build()
        was_training = pl_module.training
        pl_module.eval()
        try:
            results = self.evaluator.evaluate(
                {site: sae_replacement(pl_module.sae(site)) for site in pl_module.sites})
        finally:
            pl_module.train(was_training)
        self.history.append({"step": trainer.global_step, **results})
        values = {f"eval/{site}/{name}": value for site, r in results.items()
                  for name, value in r.items()}
        for logger in trainer.loggers:  # straight to the loggers: rank 0 only, once per eval
            logger.log_metrics(values, step=trainer.global_step)
        log.info("step %d spliced eval: %s", trainer.global_step, ", ".join(
            f"{site} CE recovered {r['ce_loss_recovered']:.3f}, KL {r['kl']:.4f}"
            for site, r in results.items()))
