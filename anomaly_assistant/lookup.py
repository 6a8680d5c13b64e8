"""Drafting from the training answers: greedy decoding that checks several guessed tokens per forward.

A small language model on a CPU spends an inspection reading its weights once per generated token. The answers
it was trained on are templated ("The image shows a woven fabric with a regular over-under thread pattern. At
the lower part there is ..."), so the next few tokens are usually a continuation of some training answer that
ends with the same n-gram. transformers' assisted generation takes such a guess, scores all of it in one
forward and keeps the prefix the model itself would have chosen greedily, plus the model's own next token:
the text is the model's greedy answer (up to floating-point ties), in fewer forwards.

The guesses come from `lookup_corpus.json` in the checkpoint folder: the assistant turns of the SFT data,
written by `train sft` (and carried on by `train grpo` and the pipeline). A checkpoint without one decodes
one token per forward as before. `AnomalyOuterMixin._get_candidate_generator` hands transformers the
`CorpusLookupCandidateGenerator` when a model carries a corpus and a call asks for `prompt_lookup_num_tokens`;
`AnomalyAssistant` asks for it on single-image greedy calls.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

logger = logging.getLogger(__name__)

CORPUS_FILE = "lookup_corpus.json"
DRAFT_TOKENS = 16  # most tokens guessed per forward (a template sentence; guesses stop earlier when unsure)
MAX_CORPUS_CHARS = 1_000_000  # about 250 k tokens: a guess's scan of the corpus stays a few ms
MAX_NGRAM = 4  # the longest ending matched in the corpus (longer endings choose their continuation better)
MIN_NGRAM = 2  # one matching token is too weak a cue to be worth a wider forward
# A guess goes on only while its next token follows at least this share of the matching positions: where the
# answers split (a defect's size word, its position) a wrong guess costs a wider forward and gains nothing.
# (16 tokens with this stop against 10 without, default model, 9 held-out images x 3: 2.39 / 2.49 s median.)
MIN_SHARE = 0.5
# Between answers in a loaded corpus: no n-gram spans it, and it is guessed as the call's end of sequence.
ANSWER_END = -1


def assistant_texts(conversations: Iterable[Any]) -> list[str]:
    """The assistant turns' texts of chat-format rows (`messages` of the SFT export)."""
    texts = []
    for messages in conversations:
        for message in messages:
            if message.get("role") != "assistant":
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text") or "" for p in content if p.get("type") == "text")
            if isinstance(content, str) and content.strip():
                texts.append(content)
    return texts


def write_corpus(texts: Iterable[str], folder: str | Path, max_chars: int = MAX_CORPUS_CHARS) -> Path | None:
    """Write the distinct answers (sorted, so the file is deterministic) into `folder`; None when empty.

    Past `max_chars` the most frequent answers are kept: every guess scans the whole corpus, and the frequent
    phrasings are the ones worth guessing.
    """
    counts = Counter(texts)
    kept, used = [], 0
    for text, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if used + len(text) > max_chars:
            break
        kept.append(text)
        used += len(text)
    if not kept:
        return None
    path = Path(folder) / CORPUS_FILE
    path.write_text(json.dumps({"answers": sorted(kept)}, ensure_ascii=False, indent=0) + "\n")
    return path


def load_corpus(folder: str | Path | None, tokenizer: Any) -> torch.Tensor | None:
    """The folder's corpus as one token sequence, each answer followed by `ANSWER_END`.

    None when the folder has none; a corpus that cannot be read is skipped with a warning (it only speeds
    decoding up, the answers do not depend on it).
    """
    if folder is None or not (Path(folder) / CORPUS_FILE).is_file():
        return None
    try:
        answers = json.loads((Path(folder) / CORPUS_FILE).read_text())["answers"]
        ids: list[int] = []
        for row in tokenizer(list(answers), add_special_tokens=False)["input_ids"]:
            ids += [*row, ANSWER_END]
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring %s in %s (%s): decoding one token per step", CORPUS_FILE, folder, err)
        return None
    return torch.tensor(ids, dtype=torch.long) if ids else None


class CorpusLookupCandidateGenerator(PromptLookupCandidateGenerator):
    """Guesses the next tokens as the corpus's most common continuation of the sequence's last n-gram.

    The longest ending (MAX_NGRAM down to MIN_NGRAM tokens) that occurs in the corpus selects the matching
    positions; each guessed token is the most common next token among them, and only the positions that
    agree go on, so the guess follows the answers' most frequent path. It stops where the answers split
    (`MIN_SHARE`), at an end of answer (guessed as the call's end of sequence `eos_token_id`) and before any
    `forbidden` token (the image and anomaly placeholders a generated answer must never hold: a forward over
    them would count them as images). Without a match nothing is guessed: transformers' own prompt lookup
    would copy from the prompt, placeholders included.
    """

    def __init__(self, corpus: torch.Tensor, eos_token_id: int, forbidden: Iterable[int] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.corpus = corpus
        self.eos = int(eos_token_id)
        self.forbidden = {int(t) for t in forbidden}

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any):
        length = input_ids.shape[1]
        room = min(self.num_output_tokens, self.max_length - length - 1)
        if input_ids.shape[0] != 1 or room <= 0:
            return input_ids, None
        sequence = input_ids[0].to(self.corpus.device)
        for n in range(min(MAX_NGRAM, length), MIN_NGRAM - 1, -1):
            windows = self.corpus[: len(self.corpus) - 1].unfold(0, n, 1)  # [M, n]
            at = (windows == sequence[-n:]).all(dim=1).nonzero(as_tuple=True)[0] + n  # [hits] next positions
            guess: list[int] = []
            while len(at) and len(guess) < room:
                following = self.corpus[at]
                token = int(torch.mode(following).values)
                share = float((following == token).float().mean())
                if token in self.forbidden or (guess and share < MIN_SHARE):
                    break
                if token == ANSWER_END:
                    guess.append(self.eos)
                    break
                guess.append(token)
                at = at[following == token] + 1
                at = at[at < len(self.corpus)]
            if guess:
                drafted = torch.tensor(guess, dtype=input_ids.dtype, device=input_ids.device)
                return torch.cat([input_ids, drafted[None]], dim=1), None
        return input_ids, None
