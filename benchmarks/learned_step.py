"""Seconds per training step of the learned steer: the KL term exact vs on the top-k vocabulary.

    python benchmarks/learned_step.py --run foxp2_runs/demo/gemma3_270m --target hi --steps 8

Reads a finished demo run (cache, localise-<t>, and the teacher answers its steer stage cached
in steer-<t>/work/teacher.json), builds foxp2_learned's support (the traced neurons of every
layer that has them, as the demo's ``learn.layers=traced``) and times ``--steps`` Adam steps of
:func:`steering.steer.learned.learn_steer` with ``HeldOutKL(top_k=None)`` (the exact KL over the
whole vocabulary, its unsteered half recomputed every step: the reference) and with
``top_k=k`` (each ``--top-k``). It also prints both KL values for the same shift (the shift after
the reference's steps) to show what the restriction leaves out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="<root>/demo/<model> of a finished demo")
    ap.add_argument("--target", default="hi")
    ap.add_argument("--model", default="gemma3_270m", help="a conf/model/ choice")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top-k", default="64,16", help="comma-separated k values")
    args = ap.parse_args()

    from steering.api import load_model
    from steering.steer.learned import (HeldOutKL, LearnConfig, NeuronShift, TeacherExample,
                                        learn_steer)
    from steering.steer.localisation import Localisation
    from steering.steer.methods.learned import cache_sentences
    from steering.steer.supports import build_support, neuron_scales

    run = Path(args.run)
    model, tok, _ = load_model(f"model={args.model}")
    loc = Localisation(run / f"localise-{args.target}")
    layers = [l for l in loc.layers if loc.t(l, "target_neurons").numel()
              + loc.t(l, "english_neurons").numel() > 0]
    text = cache_sentences(run / "cache", (args.target, "en"), "discovery")
    scales = neuron_scales(model, tok, text[args.target][:48] + text["en"][:48], layers)
    support = build_support("traced", loc, layers, scales, seed=0)
    stored = json.loads((run / f"steer-{args.target}" / "work" / "teacher.json").read_text())
    teacher = [TeacherExample(**e) for e in stored["examples"]]
    kl_ids = [tok(t)["input_ids"] for t in text[args.target][48:112]]
    pad = tok.pad_token_id or 0
    cfg = LearnConfig(steps=args.steps, progress=False)
    common = dict(target=args.target, english="en", method="foxp2_learned", decode_steps=4,
                  sustain=0.33, pad_id=pad)

    rows = []
    exact = HeldOutKL(model, kl_ids, pad_id=pad)
    t0 = time.perf_counter()
    result = learn_steer(model, support, teacher, exact, cfg, **common)
    rows.append(["exact (whole vocabulary)", None, (time.perf_counter() - t0) / args.steps,
                 None])
    steer = NeuronShift(support)
    with torch.no_grad():  # the reference's final shift (σ·θ in the artifact), as θ again
        for edit in result.artifact.edits:
            pos = {int(i): k for k, i in enumerate(support.index[edit.layer].tolist())}
            for i, v in zip(edit.add_index.tolist(), edit.add.tolist()):
                k = pos[int(i)]
                steer.theta[str(edit.layer)][k] = v / float(support.scale[edit.layer][k])
    same = list(range(min(16, len(exact))))
    with torch.no_grad():
        rows[0][3] = float(exact(steer, same, "prompt_end", 4, 0.33))
    for k in [int(x) for x in args.top_k.split(",")]:
        t_build = time.perf_counter()
        held = HeldOutKL(model, kl_ids, pad_id=pad, top_k=k)
        build = time.perf_counter() - t_build
        t0 = time.perf_counter()
        learn_steer(model, support, teacher, held, cfg, **common)
        per_step = (time.perf_counter() - t0) / args.steps
        with torch.no_grad():
            restricted = float(held(steer, same, "prompt_end", 4, 0.33))
        rows.append([f"top-{k} ({held.vocab.numel()} tokens; set-up {build:.0f} s)", k,
                     per_step, restricted])
    print(f"\nfoxp2_learned on {support.size} neurons of {len(layers)} layers, {args.target}, "
          f"batch {cfg.batch_size}, {args.steps} steps each")
    print(f"{'KL term':<44}{'s/step':>8}{'speed-up':>10}{'KL of the same θ':>18}")
    for name, _k, per_step, kl in rows:
        print(f"{name:<44}{per_step:>8.2f}{rows[0][2] / per_step:>9.2f}×{kl:>18.4f}")


if __name__ == "__main__":
    main()
