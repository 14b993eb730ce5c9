"""Tiny random models with real tokenizers, for tests and quick runs.

Tokenizers are trained in-process on the embedded corpus, so both families the project must
handle are exercised in seconds: a byte-level BPE (GPT-2 / Llama-3 style, where raw token strings
are byte-mapped) and a SentencePiece model (Gemma style, ``▁`` word markers). The model and its
tokenizer are written once to a local HF folder, so they load through the very same
``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_ARCHITECTURES = ("llama", "gemma3", "gpt2")
_MARKER = "foxp2_tiny.json"
_TINY_VERSION = 2  # bump when the recipe changes so stale folders are rebuilt


def tiny_training_texts() -> list[str]:
    """Every text of the embedded corpus (all languages, prompts too)."""
    from sae_train.corpora.embedded import load_embedded_corpus, load_embedded_prompts

    corpus = load_embedded_corpus()
    texts = [t for lang in corpus.languages for t in corpus.texts[lang]]
    texts += [p.text for p in load_embedded_prompts()]
    return texts


def train_byte_level_bpe(texts: list[str], vocab_size: int = 1024, add_bos: bool = True):
    """A GPT-2/Llama-3 style byte-level BPE as a ``PreTrainedTokenizerFast`` (left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|begin_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if add_bos else None, padding_side="left",
    )


def train_sentencepiece(texts: list[str], out_dir: Path, vocab_size: int = 1024):
    """A Gemma-style SentencePiece BPE: pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy
    prefix (so, as in Gemma, only words after a space carry ``▁``), BOS added on encode."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, byte_fallback=True,
        num_threads=1, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        minloglevel=2,
    )
    tok = GemmaTokenizer.from_pretrained(str(out_dir), add_bos_token=True)
    tok.padding_side = "left"
    return tok


def _tiny_config(arch: str, vocab_size: int, tokenizer):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    special = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, **special,
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
            max_position_embeddings=512, layer_types=["sliding_attention", "sliding_attention",
                                                      "full_attention", "sliding_attention"],
            **special,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                          **special)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")


def build_tiny(arch: str, seed: int = 0, vocab_size: int = 1024, work_dir: Path | None = None):
    """Build (model, tokenizer): random weights from ``seed``, a tokenizer trained on the
    embedded corpus (SentencePiece files go to ``work_dir``, which must outlive the tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = tiny_training_texts()
    if arch == "gemma3":
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="foxp2-spm-"))
        tokenizer = train_sentencepiece(texts, work_dir / "spm", vocab_size)
    else:
        tokenizer = train_byte_level_bpe(texts, vocab_size, add_bos=arch != "gpt2")
    config = _tiny_config(arch, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def materialize_tiny(arch: str, cache_root: str | Path, seed: int = 0) -> Path:
    """Write the tiny model + tokenizer to ``<cache_root>/models/tiny-<arch>`` once; reuse after."""
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    target = Path(cache_root) / "models" / f"tiny-{arch}-s{seed}"
    marker = target / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == _TINY_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-work-"))
    try:
        model, tokenizer = build_tiny(arch, seed, work_dir=work)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"arch": arch, "seed": seed,
                                               "version": _TINY_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its folder is identical
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return target
