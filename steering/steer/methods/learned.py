"""Learned steers: FOXP2's neurons with learned amplitudes, its controls, and LinEAS.

``foxp2_learned``         the shift on FOXP2's traced neurons N_t ∪ N_en (the steering window's,
                          or every traced layer's with ``learn.layers=traced``) learned end to end
                          against the model's own native answers (:mod:`steering.steer.learned`)
``foxp2_learned_random``  the same objective on as many random neurons per layer (seeded): does
                          the localisation matter?
``foxp2_learned_dense``   the same objective on every neuron of those layers
``lineas``                LinEAS (:mod:`steering.steer.lineas`): affine maps on every neuron of
                          those layers, sliced Wasserstein to target-language activations

Each is trained once (the app's ``learn.*`` keys), then γ — the artifact's λ, the learned edit
scaled as a whole — is chosen on the tuning split among ``learn.gammas`` with the app's budget
and objective, like every other strength.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from steering.steer.artifact import SteeringArtifact
from steering.steer.learned import HeldOutKL, LearnConfig, LearnedSteerError, learn_steer
from steering.steer.lineas import LineasConfig, learn_lineas
from steering.steer.methods.spec import BuildRequest, MethodSpec, Tuned, Tuner, Tuning
from steering.steer.supports import build_support, neuron_scales

log = logging.getLogger(__name__)

SUPPORT_OF = {"foxp2_learned": "traced", "foxp2_learned_random": "random",
              "foxp2_learned_dense": "dense", "lineas": "dense"}


def cache_sentences(cache_dir: str | Path, languages: Sequence[str], split: str
                    ) -> dict[str, list[str]]:
    """Per language, its texts in ``split`` from the activation cache's documents.jsonl (the
    file is read once for all of them)."""
    path = Path(cache_dir) / "documents.jsonl"
    if not path.is_file():
        raise LearnedSteerError(f"{path} is missing: the activation cache holds the corpus")
    out: dict[str, list[str]] = {lang: [] for lang in languages}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == split and row.get("language") in out:
                out[row["language"]].append(row["text"])
    empty = [lang for lang, texts in out.items() if not texts]
    if empty:
        raise LearnedSteerError(f"no {empty} documents of split {split!r} in {path}")
    return out


def steer_layers(request: BuildRequest) -> list[int]:
    """The window, or every analysed layer with traced neurons (``learn.layers=traced``)."""
    loc, learn = request.localisation, request.config.learn
    if learn.layers == "window":
        return list(request.window)
    return [l for l in loc.layers if loc.t(l, "target_neurons").numel()
            + loc.t(l, "english_neurons").numel() > 0]


def _inputs(request: BuildRequest):
    if request.model is None or request.config is None:
        raise LearnedSteerError("learned methods need the model, tokenizer and the steer "
                                "app's config in the build request")
    cfg = request.config
    tok = request.tokenizer
    layers = steer_layers(request)
    discovery = cache_sentences(cfg.cache_dir, (cfg.target, cfg.english), "discovery")
    scales = neuron_scales(request.model, tok, discovery[cfg.target][:48]
                           + discovery[cfg.english][:48], layers)
    return cfg, tok, layers, discovery, scales


def build_learned(request: BuildRequest, method: str) -> SteeringArtifact:
    """Train ``method``'s steer (module docstring) and return it at λ = 1."""
    cfg, tok, layers, discovery, scales = _inputs(request)
    learn, place = cfg.learn, request.placement
    support = build_support(SUPPORT_OF[method], request.localisation, layers, scales,
                            seed=request.seed, extra=learn.extra_neurons)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    common = dict(method=method, position=place.position, decode_steps=place.decode_steps,
                  sustain=place.sustain, pad_id=pad,
                  provenance={**request.localisation.provenance(), "layers": layers,
                              "support": SUPPORT_OF[method],
                              "extra_neurons": learn.extra_neurons})
    if method == "lineas":
        result = learn_lineas(
            request.model, support, [tok(t)["input_ids"] for t in discovery[cfg.english]],
            [tok(t)["input_ids"] for t in discovery[cfg.target]],
            LineasConfig(steps=learn.lineas_steps, lr=learn.lineas_lr,
                         l1_weight=learn.lineas_l1_weight,
                         n_projections=learn.lineas_projections, seed=request.seed,
                         progress=cfg.progress),
            target_lang=cfg.target, english_lang=cfg.english, **common)
    else:
        if request.teacher is None:
            raise LearnedSteerError(f"{method} needs teacher answers (the evaluate stage "
                                    "provides them)")
        kl_text = HeldOutKL(request.model, [tok(t)["input_ids"] for t in
                                            discovery[cfg.target][48:48 + learn.kl_sentences]],
                            pad_id=pad, top_k=learn.kl_top_k)
        result = learn_steer(
            request.model, support, request.teacher(), kl_text,
            LearnConfig(steps=learn.steps, lr=learn.lr, batch_size=learn.batch_size,
                        first_tokens=learn.first_tokens, first_weight=learn.first_weight,
                        kl_weight=learn.kl_weight, l1_weight=learn.l1_weight,
                        max_answer_tokens=learn.max_answer_tokens, init=learn.init,
                        relevance_weight=learn.relevance_weight,
                        relevance_margin=learn.relevance_margin, seed=request.seed,
                        progress=cfg.progress),
            target=cfg.target, english=cfg.english, **common)
    log.info("%s: %d of %d neurons non-zero after %.0f s", method, result.n_nonzero,
             result.support_size, result.seconds)
    result.artifact.provenance["train_seconds"] = result.seconds
    result.artifact.provenance["history"] = result.history[::10] + result.history[-1:]
    return result.artifact


def search_gamma(request: BuildRequest, tuner: Tuner, method: str) -> Tuned:
    """Train once, then tune γ (the artifact's λ) over ``learn.gammas`` on the tuning split
    with the app's budget and objective (the tuner's λ line at β = 0: a learned edit has no
    English term)."""
    import dataclasses

    art = build_learned(request, method)
    gammas = list(request.config.learn.gammas)
    own = dataclasses.replace(tuner, config=dataclasses.replace(tuner.config, lams=gammas))
    tuned = own.tune(art, "lam")
    tuned.record.update({"gammas": gammas, "nonzero": art.provenance.get("nonzero"),
                         "support_size": art.provenance.get("support_size"),
                         "train_seconds": art.provenance.get("train_seconds")})
    return tuned


def _spec(name: str, summary: str, role: str) -> MethodSpec:
    return MethodSpec(name, lambda request: build_learned(request, name),
                      Tuning("lam", search=lambda request, tuner: search_gamma(request, tuner,
                                                                                 name)),
                      summary, config_section="learn", role=role)


FOXP2_LEARNED = _spec("foxp2_learned", "FOXP2's traced neurons, amplitudes learned against "
                      "the model's own native answers", "foxp2")
FOXP2_LEARNED_RANDOM = _spec("foxp2_learned_random", "the same objective on random neurons "
                             "of the same count", "control")
FOXP2_LEARNED_DENSE = _spec("foxp2_learned_dense", "the same objective on every neuron of "
                            "the layers", "control")
LINEAS = _spec("lineas", "LinEAS: per-neuron affine maps, sliced Wasserstein to target text",
               "baseline")
