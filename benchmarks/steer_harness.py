"""Cost of the evaluation harness for one method, against a plain reference in the same run.

    python benchmarks/steer_harness.py                        # demo model, the demo's sizes
    python benchmarks/steer_harness.py --model tiny_llama     # smoke run

One method's evaluation (greedy continuations + ΔM, their NLL under the unsteered model,
KL / NLL change on held-out target text in two position modes) and one tuning point (ΔM over
T steps + KL_gen), each timed two ways on the same prompts, sentences and steer:

  plain     decode in batches of 16; the held-out text's unsteered log-probs recomputed on
            every call; the continuation NLL from full-sequence logits
  harness   steering.evaluate.harness as the pipeline runs it: 64-row decode batches, the unsteered
            final hidden states of each split computed once (HeldOutText), the LM head only at
            the continuation's scored columns and in vocabulary chunks (steering.language.head)

Both must give the same numbers (printed: the largest absolute difference). A synthetic
neuron-mode artifact (3 layers × 24 MLP neurons) stands in for a tuned one: the cost does not
depend on which neurons are pushed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def synthetic_neuron_artifact(model, layers: list[int], n_neurons: int = 24):
    from steering.steer.artifact import LayerEdit, SteeringArtifact

    width = model.config.get_text_config().intermediate_size
    g = torch.Generator().manual_seed(0)
    edits = []
    for layer in layers:
        index = torch.randperm(width, generator=g)[:n_neurons].sort().values
        edits.append(LayerEdit(layer=layer, space="neurons", add=torch.full((n_neurons,), 0.5),
                               add_index=index))
    return SteeringArtifact(method="synthetic", target="es", edits=edits, lam=1.0, beta=0.0,
                            decode_steps=3, sustain=0.33)


@torch.no_grad()
def plain_continuation_nll(model, tokenizer, prompts, continuations, skip, template):
    """The reference: full-sequence logits and log-softmax, one batch of 16 at a time."""
    from steering.language.defaultness import left_pad

    device = next(model.parameters()).device
    out = np.full(len(prompts), np.nan)
    rows = [(i, tokenizer(template.format(prompt=p))["input_ids"], c)
            for i, (p, c) in enumerate(zip(prompts, continuations)) if len(c) > skip]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        ids, attn = left_pad([a + c for _, a, c in chunk], pad)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logp = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                     position_ids=pos.to(device), use_cache=False).logits.float().log_softmax(-1)
        width = ids.shape[1]
        for b, (i, _, c) in enumerate(chunk):
            cols = torch.arange(width - len(c) + skip, width, device=device)
            out[i] = float(-logp[b, cols - 1].gather(-1, ids[b, cols].to(device)[:, None]).mean())
    return out


def main() -> None:
    from omegaconf import OmegaConf

    from sae_train.config import ModelConfig
    from sae_train.corpora.embedded import load_embedded_corpus, load_embedded_prompts
    from sae_train.models.loading import load_model
    from steering.apps import config_dir
    from steering.evaluate.harness import (EvalSettings, HeldOutText, continuation_nll, generate,
                                           nll_guard_skip, sentence_scores)
    from steering.language.token_sets import LanguageTokenSets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma3_270m", help="a conf/model/ name")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--sentences", type=int, default=32)
    p.add_argument("--tune-prompts", type=int, default=16)
    p.add_argument("--tune-sentences", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = OmegaConf.load(f"{config_dir()}/model/{args.model}.yaml")
    raw.pop("defaults", None)
    model, tokenizer, info = load_model(OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)))
    tokenizer.padding_side = "left"
    n_layers = model.config.get_text_config().num_hidden_layers
    art = synthetic_neuron_artifact(model, sorted({max(0, n_layers - k) for k in (6, 5, 4)}))
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = np.arange(vocab)  # token sets only weigh ΔM; their content does not change the cost
    sets = LanguageTokenSets.from_ids({"es": ids[ids % 7 == 0], "en": ids[ids % 7 == 1]}, vocab)
    prompts = [q.text for q in load_embedded_prompts(["evaluation"])][:args.prompts]
    corpus = load_embedded_corpus(splits=["evaluation", "tuning"])
    sentences = corpus.texts["es"][:args.sentences]
    tune_sentences = corpus.texts["es"][-args.tune_sentences:]
    tune_prompts = prompts[:args.tune_prompts]
    skip = nll_guard_skip(art.decode_steps)

    plain_settings = EvalSettings(max_new_tokens=args.new_tokens, gen_batch_size=16)
    fast_settings = EvalSettings(max_new_tokens=args.new_tokens, gen_batch_size=64)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    rows, diffs = [], {}
    # one method's evaluation ------------------------------------------------------------
    g_plain, t1 = timed(lambda: generate(model, tokenizer, prompts, art, sets, "es", "en",
                                         plain_settings))
    n_plain, t2 = timed(lambda: plain_continuation_nll(model, tokenizer, prompts,
                                                       g_plain.new_ids, skip,
                                                       plain_settings.template))
    s_plain, t3 = timed(lambda: sentence_scores(model, tokenizer, sentences, art))
    rows.append(("evaluation", "plain", t1, t2, t3))
    text = HeldOutText(model, tokenizer, sentences, fast_settings.batch_size)
    sentence_scores(model, tokenizer, text, None, modes=("gen",))  # once per split, shared
    g_fast, t1 = timed(lambda: generate(model, tokenizer, prompts, art, sets, "es", "en",
                                        fast_settings))
    n_fast, t2 = timed(lambda: continuation_nll(model, tokenizer, prompts, g_plain.new_ids, skip,
                                                fast_settings.template, 16, art))
    s_fast, t3 = timed(lambda: sentence_scores(model, tokenizer, text, art))
    rows.append(("evaluation", "harness", t1, t2, t3))
    diffs["ΔM"] = float(np.abs(g_fast.delta_m - g_plain.delta_m).max())
    diffs["continuation NLL"] = float(np.nanmax(np.abs(n_fast - n_plain)))
    diffs["KL gen/all"] = max(float(np.abs(s_fast.kl[m] - s_plain.kl[m]).max())
                              for m in ("gen", "all"))
    # one tuning point ------------------------------------------------------------------
    _, t1 = timed(lambda: generate(model, tokenizer, tune_prompts, art, sets, "es", "en",
                                   plain_settings, max_new_tokens=3))
    _, t3 = timed(lambda: sentence_scores(model, tokenizer, tune_sentences, art, modes=("gen",)))
    rows.append(("tuning point", "plain", t1, 0.0, t3))
    tune_text = HeldOutText(model, tokenizer, tune_sentences, fast_settings.batch_size)
    sentence_scores(model, tokenizer, tune_text, None, modes=("gen",))
    _, t1 = timed(lambda: generate(model, tokenizer, tune_prompts, art, sets, "es", "en",
                                   fast_settings, max_new_tokens=3))
    _, t3 = timed(lambda: sentence_scores(model, tokenizer, tune_text, art, modes=("gen",)))
    rows.append(("tuning point", "harness", t1, 0.0, t3))

    print(f"\n{info.name} ({info.dtype}, {torch.get_num_threads()} threads): "
          f"{len(prompts)} prompts × {args.new_tokens} new tokens, {len(sentences)} held-out "
          f"sentences; tuning {len(tune_prompts)} prompts × 3 steps, {len(tune_sentences)} "
          "sentences\n")
    print("| work | path | decode s | continuation NLL s | held-out text s | total s | vs plain |")
    print("|---|---|---:|---:|---:|---:|---:|")
    plain_total = {}
    for work, path, a, b, c in rows:
        total = a + b + c
        plain_total.setdefault(work, total)
        print(f"| {work} | {path} | {a:.2f} | {b:.2f} | {c:.2f} | {total:.2f} | "
              f"{plain_total[work] / total:.2f}× |")
    print("\nlargest |harness − plain|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
