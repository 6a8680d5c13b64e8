"""Tiny backbones built entirely in code: configs, a small BPE tokenizer, image-only processors, weights.

Tests and the embedded default use these instead of downloaded checkpoints. Each family keeps the real
architecture, processor and token layout (same patch sizes, merge units, window permutation, anyres crops,
CLS handling), only with few, narrow layers and small images (112-224 px), so that a forward + loss takes
~10-20 ms on one CPU core. Weights are random (seeded); the tokenizer is a byte-level BPE trained on a short
built-in corpus, so any text round-trips and the answer grammar's words are a few tokens each.

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    save_tiny("llava", "/tmp/tiny-llava")  # then backbones.get("llava").load("/tmp/tiny-llava")
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .backbones import ANOMALY_TOKENS, LEVEL_WORDS, add_anomaly_tokens, get

# A short domain corpus for the BPE merges: the answer grammar, inspection vocabulary, chat phrasing.
_CORPUS = """
<think>The surface shows a thin dark scratch near the top left corner, which is not present on the normal
reference.</think><answer>{"verdict": "anomalous", "defect_type": "scratch", "boxes": [[12, 40, 88, 52]],
"rationale": "A linear scratch crosses the upper left region of the part."}</answer>
<think>The texture is uniform and matches the reference images.</think><answer>{"verdict": "normal",
"defect_type": null, "boxes": [], "rationale": "No defect is visible; the part looks normal."}</answer>
Are there any defects for the object in the image? Please reply with 'Yes' or 'No'. Yes. No.
Describe the anomaly: where is it, what type is it, what could have caused it, how can it be prevented?
crack hole stain contamination missing part bent broken cut color fold glue poke rough squeeze thread
scratch dent burr chip corrosion discoloration misalignment short open spur mouse bite pin hole blowhole
fray break uneven crack in the cell finger interruption dark region bright spot solder bridge copper
The object is a metal nut, a screw, a bottle, a capsule, a pill, a cable, a transistor, a printed circuit
board, a magnetic tile, a solar cell, a carpet, a grid, leather, tile, wood, a zipper, a hazelnut.
The defect is located at the center, on the left side, on the right side, at the bottom, near the edge.
The likely cause is mechanical damage during handling, a manufacturing error or contamination in the
process. It affects the function and appearance of the product. It can be prevented by better inspection,
careful handling, cleaning the tools and calibrating the machine.
slightly suspicious moderately suspicious highly suspicious features
You are a helpful assistant. What do you see in this image? The image shows an industrial part.
0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 112 128 224 256 384 448 512
"""

_TOKENIZER_VOCAB = 640


@lru_cache(maxsize=1)
def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (Qwen2's pre-tokenizer) trained on `_CORPUS`: deterministic vocab and merges."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


def build_tokenizer(family: str) -> Any:
    """A `Qwen2Tokenizer` over the tiny BPE with the family's special tokens, anomaly markers and template."""
    from transformers import Qwen2Tokenizer

    module = get(family)
    vocab, merges = _bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None, eos_token=None,
        pad_token=None,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(module.SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    add_anomaly_tokens(tokenizer)
    tokenizer.eos_token = module.EOS_TOKEN
    tokenizer.pad_token = module.PAD_TOKEN
    tokenizer.chat_template = module.CHAT_TEMPLATE
    return tokenizer


def _pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


# The LLM's size: the smallest that still has the real architecture. `build_tiny(..., **llm)` overrides any
# of these (e.g. `save_tiny(..., hidden_size=128, num_attention_heads=8, ...)` for a wider tiny backbone that
# `train pipeline --model DIR` starts from).
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}


def tiny_config(family: str, tokenizer: Any, **llm: int) -> Any:
    """The family's tiny config (`backbones.<family>.tiny_config`) around a 2-layer, 64-wide LLM.

    `llm` overrides sizes of `TINY_LLM`.
    """
    unknown = set(llm) - set(TINY_LLM)
    if unknown:
        raise ValueError(f"unknown tiny LLM sizes {sorted(unknown)}; known: {sorted(TINY_LLM)}")
    vocab_size = _pad_vocab(len(tokenizer))
    text = {
        "vocab_size": vocab_size, **TINY_LLM, **llm, "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    return get(family).tiny_config(tokenizer, text)


def build_tiny(family: str, seed: int = 0, **llm: int) -> tuple[Any, Any]:
    """(model, processor) of a tiny random backbone of `family`, in eval mode, float32, no downloads.

    `llm`: sizes of the language model other than `TINY_LLM` (hidden_size=128, num_hidden_layers=4, ...).
    """
    module = get(family)
    tokenizer = build_tokenizer(family)
    processor = module.build_tiny_processor(tokenizer)
    config = tiny_config(family, tokenizer, **llm)
    model_cls = module.MODEL_CLASS
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen.bos_token_id = None
    gen.do_sample = False
    return model, processor


def save_tiny(family: str, path: str | Path, seed: int = 0, **llm: int) -> Path:
    """Build a tiny backbone and save model + processor to `path` (`backbones.get(family).load` reads it)."""
    path = Path(path)
    model, processor = build_tiny(family, seed=seed, **llm)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


__all__ = [
    "ANOMALY_TOKENS", "LEVEL_WORDS", "TINY_LLM", "build_tiny", "build_tokenizer", "save_tiny", "tiny_config"
]
