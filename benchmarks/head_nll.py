"""Teacher-forced token NLL through the chunked LM head vs the plain full-vocabulary log-softmax.

    python benchmarks/head_nll.py                      # demo model (Gemma-3-270m, 262k vocab)
    python benchmarks/head_nll.py --model tiny_llama   # smoke run (seconds)

Two timed workloads, each against its plain reference in the same run (best of ``--repeats``):

1. ``continuation_nll`` as the relevance guard calls it: ``--prompts`` evaluation prompts in
   batches of 16, each with a ``--tokens``-token answer (the unsteered model's own greedy
   answer). Reference: the model's forward with ``logits_to_keep`` then
   ``logits.float().log_softmax(-1)`` (the code before ``steering.language.head``).
2. The learned steer's answer NLL, forward + backward with respect to the hidden states, on
   16 × ``--tokens`` positions. Reference: ``head.logits(h).log_softmax(-1)`` under autograd.
3. Held-out text: NLL and KL(steered ‖ base) of ``--sentences`` Spanish tuning sentences
   (batches of 16) under a random all-positions push on every 16th MLP neuron at layer 9, the base computed once
   as in the steer stage. Reference: full logits, float32 log-softmax, base log-probs kept
   (1 GB at 48 sentences), KL over the whole vocabulary.

4. The greedy decode of the evaluation (``--prompts`` × ``--tokens`` new tokens, batches of 16,
   the headline no-repeat 3-gram ban): the chunked step (``HeadBypass`` + ``step_masses``)
   against the full-logits step with transformers' processor, which a no-op hook on the head
   forces. Printed: whether the tokens are the same, and the largest ΔM difference.

Printed: seconds, speed-up and the largest absolute difference of the NLLs (and gradients).
"""

from __future__ import annotations

import argparse
import os
import time

from timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from sae_train.corpora.embedded import load_embedded_prompts
    from sae_train.models.loading import cpu_has_native_bf16
    from steering import api
    from steering.evaluate.harness import EvalSettings, continuation_nll, generate
    from steering.language.defaultness import DEFAULT_TEMPLATE, left_pad, pad_token_id
    from steering.language.head import OutputHead, decoder_body
    from steering.language.token_sets import LanguageTokenSets

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = api.load_model(f"model={args.model}")
    tokenizer.padding_side = "left"
    prompts = [p.text for p in load_embedded_prompts(["evaluation"])][:args.prompts]
    vocab = np.arange(len(tokenizer))
    sets = LanguageTokenSets.from_ids({"es": vocab[vocab % 7 == 0], "en": vocab[vocab % 7 == 1]},
                                      len(tokenizer))  # the masses are not timed here
    answers = generate(model, tokenizer, prompts, None, sets, "es", "en",
                       EvalSettings(max_new_tokens=args.tokens)).new_ids
    cpu = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no native bf16"
    print(f"model {args.model} ({model.dtype}, vocabulary {len(tokenizer)}); CPU {cpu}, "
          f"{os.cpu_count()} cores, {args.threads} thread(s); best of {args.repeats}")

    @torch.no_grad()
    def plain_continuation_nll():
        out = np.full(len(prompts), np.nan)
        for start in range(0, len(prompts), 16):
            seqs = [tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"] + list(a)
                    for p, a in zip(prompts[start:start + 16], answers[start:start + 16])]
            ids, attn = left_pad(seqs, pad_token_id(tokenizer))
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(a) for a in answers[start:start + 16]) + 1
            logp = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                         logits_to_keep=keep).logits.float().log_softmax(-1)
            width = ids.shape[1]
            for b, a in enumerate(answers[start:start + 16]):
                cols = torch.arange(width - len(a), width)
                out[start + b] = float(-logp[b, cols - 1 - (width - keep)].gather(
                    -1, ids[b, cols][:, None]).mean())
        return out

    t_plain, ref = best_of(plain_continuation_nll, args.repeats)
    t_chunk, got = best_of(lambda: continuation_nll(model, tokenizer, prompts,
                                                  [list(a) for a in answers], 0),
                         args.repeats)
    print("| workload | plain s | chunked head s | speed-up | max abs NLL diff |")
    print("|---|---|---|---|---|")
    print(f"| continuation_nll, {len(prompts)} answers × ≤{args.tokens} tokens | {t_plain:.2f} | "
          f"{t_chunk:.2f} | {t_plain / t_chunk:.2f}× | {np.nanmax(np.abs(got - ref)):.1e} |")

    head = OutputHead.of(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ids = tokenizer(prompts[:16], padding=True, return_tensors="pt")
        hidden = decoder_body(model)(**ids).last_hidden_state.flatten(0, 1)
    hidden = hidden[torch.randint(0, hidden.shape[0], (16 * args.tokens,), generator=g)]
    targets = torch.randint(0, head.weight.shape[0], (hidden.shape[0],), generator=g)

    def fwd_bwd(chunked: bool):
        def run():
            h = hidden.clone().requires_grad_(True)
            nll = head.token_nll(h, targets) if chunked else -head.logits(h).log_softmax(-1) \
                .gather(-1, targets[:, None]).squeeze(-1)
            nll.mean().backward()
            return nll.detach(), h.grad
        return run

    t_plain, (ref_nll, ref_grad) = best_of(fwd_bwd(False), args.repeats)
    t_chunk, (nll, grad) = best_of(fwd_bwd(True), args.repeats)
    print(f"| answer NLL forward + backward, {hidden.shape[0]} positions | {t_plain:.2f} | "
          f"{t_chunk:.2f} | {t_plain / t_chunk:.2f}× | {float((nll - ref_nll).abs().max()):.1e} "
          f"(gradient {float((grad.float() - ref_grad.float()).abs().max()):.1e}) |")

    held_out(model, tokenizer, args)
    decode(model, tokenizer, prompts, sets, args)


def decode(model, tokenizer, prompts, sets, args) -> None:
    import numpy as np

    from steering.evaluate.harness import EvalSettings, generate

    settings = EvalSettings(max_new_tokens=args.tokens, no_repeat_ngram_size=3, batch_size=16)

    def run():
        return generate(model, tokenizer, prompts, None, sets, "es", "en", settings)

    t_chunk, chunked = best_of(run, args.repeats)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: None)
    try:
        t_plain, plain = best_of(run, args.repeats)
    finally:
        handle.remove()
    same = chunked.new_ids == plain.new_ids
    print(f"| greedy decode, {len(prompts)} prompts × {args.tokens} tokens, no repeated 3-gram | "
          f"{t_plain:.2f} | {t_chunk:.2f} | {t_plain / t_chunk:.2f}× | same tokens: {same}, ΔM "
          f"{float(np.abs(chunked.delta_m - plain.delta_m).max()):.1e} |")


def held_out(model, tokenizer, args) -> None:
    import numpy as np
    import torch

    from sae_train.corpora.embedded import load_embedded_prompts, load_prompt_translations
    from steering.evaluate.harness import HeldOutText, sentence_scores
    from steering.language.defaultness import left_pad, pad_token_id
    from steering.steer.artifact import LayerEdit, SteeringArtifact
    from steering.steer.runtime import steer

    spanish = load_prompt_translations("es")
    sentences = [spanish[p.id] for p in load_embedded_prompts(["tuning"])
                 if p.id in spanish][:args.sentences]
    width = model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    layer = min(9, model.config.num_hidden_layers - 1)
    edit = LayerEdit(layer=layer, space="neurons", add_index=torch.arange(0, width, 16),
                     add=torch.randn(len(range(0, width, 16)), generator=g))
    art = SteeringArtifact(method="benchmark", target="es", edits=[edit], beta=0.0,
                           position="all")
    batches = []
    for start in range(0, len(sentences), 16):
        ids, attn = left_pad(tokenizer(sentences[start:start + 16])["input_ids"],
                             pad_token_id(tokenizer))
        batches.append((ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)))

    @torch.no_grad()
    def plain():
        def logp(ids, attn, pos):
            return model(input_ids=ids, attention_mask=attn, position_ids=pos,
                         use_cache=False).logits[:, :-1].float().log_softmax(-1)
        bases = [logp(*b) for b in batches]
        start, t0, kls = time.perf_counter(), None, []
        for (ids, attn, pos), base in zip(batches, bases):
            with steer(model, art, position="all"):
                steered = logp(ids, attn, pos)
            valid = (attn[:, 1:] * attn[:, :-1]).float()
            kl = (steered.exp() * (steered - base)).sum(-1)
            kls.append(((kl * valid).sum(-1) / valid.sum(-1)).numpy())
        return time.perf_counter() - start, np.concatenate(kls)

    def chunked():
        text = HeldOutText(model, tokenizer, sentences, 16)
        sentence_scores(model, tokenizer, text, None, modes=())  # the base, kept
        start = time.perf_counter()
        kl = sentence_scores(model, tokenizer, text, art, modes=("all",)).kl["all"]
        return time.perf_counter() - start, kl

    t_plain, ref = min((plain() for _ in range(args.repeats)), key=lambda r: r[0])
    t_chunk, got = min((chunked() for _ in range(args.repeats)), key=lambda r: r[0])
    print(f"| held-out KL + NLL of one steer, {len(sentences)} sentences (base kept) | "
          f"{t_plain:.2f} | {t_chunk:.2f} | {t_plain / t_chunk:.2f}× | KL "
          f"{float(np.abs(got - ref).max()):.1e} (mean KL {float(ref.mean()):.3f}) |")


if __name__ == "__main__":
    main()
