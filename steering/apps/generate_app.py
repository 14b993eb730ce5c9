"""`foxp2-generate`: base vs steered continuations, side by side (Hydra app).

    foxp2-generate artifact=foxp2_runs/demo/gemma3_270m/steer-hi/artifacts/foxp2
    foxp2-generate artifact=... 'prompts=["What is rain?","Name a fruit."]' gamma=1.5
    foxp2-generate artifact=... prompts_file=my_prompts.txt max_new_tokens=64 model=tiny_llama

Prompts are formatted with ``template`` (a base model's "Question: …\\nAnswer:") and generated
greedily in batches with left padding; the artifact's tuned strengths are used unless
``gamma`` is given. Output: one block per prompt on stdout, and (``out_file``) a JSONL file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sae_train.apps import report_user_errors
from sae_train.config import ModelConfig, PathsConfig, register_configs
from steering.apps import config_dir
from steering.language.defaultness import DEFAULT_TEMPLATE


@dataclass
class GenerateAppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # A steering artifact folder (foxp2-steer writes <out_dir>/artifacts/<method>/).
    artifact: str = "???"
    prompts: list[str] = field(default_factory=lambda: [
        "What is the best way to learn to cook?", "Why is the sky blue?",
        "Describe your favourite season."])
    # A text file with one prompt per line (replaces `prompts`).
    prompts_file: Optional[str] = None
    template: str = DEFAULT_TEMPLATE
    gamma: Optional[float] = None
    position: Optional[str] = None
    max_new_tokens: int = 48
    # Greedy decoding's repetition penalty (1: plain greedy; 1.2–1.3 curbs a small base
    # model's loops, for the steered and the unsteered run alike).
    repetition_penalty: float = 1.0
    # ... and never repeating an n-gram of this size (0: off; the demo's headline decoding
    # is no_repeat_ngram_size=3, docs/results.md).
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
    out_file: Optional[str] = None
    # Use an artifact whose steer.json or tensors were edited after it was saved (their
    # checksums do not match; refused by default).
    allow_edited: bool = False
    # Refuse an artifact built for another model (its recorded fingerprint: architecture,
    # widths, vocabulary); false steers anyway.
    check_model: bool = True


ConfigStore.instance().store(name="generate_schema", node=GenerateAppConfig)
register_configs()


def run_generate(cfg) -> list[dict]:
    import torch

    from sae_train.models.loading import load_model
    from steering.language.defaultness import left_pad, pad_token_id
    from steering.steer.artifact import SteeringArtifact
    from steering.steer.runtime import check_model_matches, prompt_with_prefix, steer

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    check_generate_config(cfg)
    art = SteeringArtifact.load(cfg.artifact, allow_edited=cfg.allow_edited)
    prompts = cfg.prompts
    if cfg.prompts_file:
        if not Path(cfg.prompts_file).is_file():
            raise ValueError(f"prompts_file={cfg.prompts_file}: no such file")
        prompts = [l.strip() for l in Path(cfg.prompts_file).read_text().splitlines() if l.strip()]
    if not prompts:
        raise ValueError("no prompts: give prompts=[...] or prompts_file=<file>")
    model, tokenizer, info = load_model(cfg.model)
    if cfg.check_model:
        check_model_matches(model, art, tokenizer)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)

    @torch.no_grad()
    def run(texts, steered: bool) -> list[str]:
        outs = []
        for s in range(0, len(texts), cfg.batch_size):
            ids, attn = left_pad([tokenizer(t)["input_ids"] for t in texts[s:s + cfg.batch_size]],
                                 pad)
            ctx = steer(model, art, gamma=cfg.gamma, position=cfg.position,
                        check_model=False) if steered \
                else torch.no_grad()
            with ctx:
                gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                     max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     repetition_penalty=cfg.repetition_penalty,
                                     no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                                     pad_token_id=pad)
            outs += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        return outs

    base = run([cfg.template.format(prompt=p) for p in prompts], steered=False)
    steered = run([cfg.template.format(prompt=prompt_with_prefix(art, p)) for p in prompts],
                  steered=True)
    rows = []
    for p, b, s in zip(prompts, base, steered):
        rows.append({"prompt": p, "base": b, "steered": s})
        print(f"\n=== {p}\n--- base:\n{b.strip()}\n--- steered ({art.method} → {art.target}, "
              f"γ={cfg.gamma if cfg.gamma is not None else art.gamma}):\n{s.strip()}")
    if cfg.out_file:
        Path(cfg.out_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in rows))
    return rows


def check_generate_config(cfg) -> None:
    """Refuse a bad setting before anything is loaded (one line naming the key)."""
    from steering.steer.artifact import POSITION_MODES, check_strengths

    if cfg.artifact in (None, "", "???"):
        raise ValueError("artifact is not set: give artifact=<a steering artifact folder>")
    check_strengths(gamma=cfg.gamma)
    if cfg.position is not None and cfg.position not in POSITION_MODES:
        raise ValueError(f"position={cfg.position!r}; use one of {POSITION_MODES}")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)}: must be ≥ 1")
    if not (cfg.repetition_penalty > 0 and cfg.repetition_penalty < float("inf")):
        raise ValueError(f"repetition_penalty={cfg.repetition_penalty}: must be a finite "
                         "number > 0")
    if cfg.no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size={cfg.no_repeat_ngram_size}: must be ≥ 0")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_generate(cfg)


if __name__ == "__main__":
    main()
