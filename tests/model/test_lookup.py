"""Drafting from the training answers (`anomaly_assistant.lookup`): same greedy text in fewer forwards."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_assistant import lookup
from anomaly_assistant.assistant import AnomalyAssistant


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype("uint8"))


def test_the_guess_follows_the_most_common_continuation_and_stops_at_an_answer_end():
    eos, end = 2, lookup.ANSWER_END  # the call's end of sequence; the corpus's end of an answer
    corpus = torch.tensor([1, 5, 6, 7, 8, end, 5, 6, 7, 9, end, 4, 5, 6, 7, 8, end])
    guesser = lookup.CorpusLookupCandidateGenerator(corpus, eos, num_output_tokens=10, max_length=100)
    drafted, logits = guesser.get_candidates(torch.tensor([[3, 3, 5, 6]]))
    assert drafted.tolist() == [[3, 3, 5, 6, 7, 8, eos]] and logits is None
    short = lookup.CorpusLookupCandidateGenerator(corpus, eos, num_output_tokens=2, max_length=100)
    assert short.get_candidates(torch.tensor([[3, 5, 6]]))[0].tolist() == [[3, 5, 6, 7, 8]]
    no_room = lookup.CorpusLookupCandidateGenerator(corpus, eos, num_output_tokens=10, max_length=5)
    assert no_room.get_candidates(torch.tensor([[3, 3, 5, 6]]))[0].tolist() == [[3, 3, 5, 6]]
    # an ending the corpus never shows: nothing guessed, not even a copy from the prompt itself
    assert guesser.get_candidates(torch.tensor([[11, 12, 11, 12]]))[0].tolist() == [[11, 12, 11, 12]]
    # where the answers split three ways the guess stops after the first token
    split = torch.tensor([5, 6, 7, 8, end, 5, 6, 7, 9, end, 5, 6, 7, 10, end])
    unsure = lookup.CorpusLookupCandidateGenerator(split, eos, num_output_tokens=10, max_length=100)
    assert unsure.get_candidates(torch.tensor([[3, 5, 6]]))[0].tolist() == [[3, 5, 6, 7]]
    # never a placeholder: a forward over one would count it as an image
    careful = lookup.CorpusLookupCandidateGenerator(corpus, eos, forbidden=[8], num_output_tokens=10,
                                                    max_length=100)
    assert careful.get_candidates(torch.tensor([[3, 5, 6]]))[0].tolist() == [[3, 5, 6, 7]]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_with_corpus")
    AnomalyAssistant.from_pretrained("tiny").save_pretrained(str(folder))
    return folder


def _forwards(assistant: AnomalyAssistant) -> list[int]:
    """Input lengths of the language model's forwards (appended to the returned list as they happen)."""
    lengths: list[int] = []
    llm = assistant.model.model.language_model
    llm.register_forward_pre_hook(lambda module, args, kw: lengths.append(kw["inputs_embeds"].shape[1]),
                                  with_kwargs=True)
    return lengths


def test_drafting_writes_the_same_answer_in_fewer_forwards(saved_tiny, monkeypatch):
    """A model whose corpus holds its own greedy answer: drafting accepts long runs of it, so the answer takes
    far fewer forwards, and the text is exactly the one-token-per-forward greedy text.

    The tiny model's random tokens do not survive decoding and encoding again, so its corpus is set as token
    ids here; the file's round trip is tested below and in tests/train/test_sft.py.
    """
    plain = AnomalyAssistant.from_pretrained(str(saved_tiny))
    assert plain.model.lookup_corpus is None
    plain_forwards = _forwards(plain)
    generate, answer_ids = plain.model.generate, []

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        answer_ids.extend(out[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    monkeypatch.setattr(plain.model, "generate", recording_generate)
    expected = plain.chat().inspect(_image(), max_new_tokens=40).raw_text
    assert len(plain_forwards) == len(answer_ids) >= 30, plain_forwards  # prefill, then one per token

    drafting = AnomalyAssistant.from_pretrained(str(saved_tiny))
    drafting.model.lookup_corpus = torch.tensor([*answer_ids, lookup.ANSWER_END])
    drafted_forwards = _forwards(drafting)
    assert drafting.chat().inspect(_image(), max_new_tokens=40).raw_text == expected
    assert len(drafted_forwards) <= len(plain_forwards) // 2, (drafted_forwards, len(plain_forwards))
    assert max(drafted_forwards[1:]) > 1  # forwards that check several guessed tokens at once
    # a streamed follow-up gets each forward's accepted tokens at once: the same reply as without drafting
    session = drafting.chat()
    session.inspect(_image(), max_new_tokens=40)
    streamed = list(session.stream("Why?", max_new_tokens=30))
    plain_session = plain.chat()
    plain_session.inspect(_image(), max_new_tokens=40)
    assert "".join(streamed) == plain_session.ask("Why?", max_new_tokens=30)
    # a corpus that misleads (another answer) costs forwards, never the text
    drafting.model.lookup_corpus = torch.tensor([*reversed(answer_ids), *answer_ids[::2]])
    assert drafting.chat().inspect(_image(), max_new_tokens=40).raw_text == expected
    # batches decode one token per forward (transformers drafts for one sequence), with the same answers
    batch = drafting.inspect_batch([_image(), _image()], max_new_tokens=40)
    assert [f.raw_text for f in batch] == [expected, expected]


def test_a_large_corpus_keeps_its_most_frequent_answers(tmp_path):
    texts = ["rare one"] + ["common answer"] * 3 + ["middle answer"] * 2 + ["another rare"]
    lookup.write_corpus(texts, tmp_path, max_chars=len("common answer") + len("middle answer"))
    kept = json.loads((tmp_path / lookup.CORPUS_FILE).read_text())["answers"]
    assert kept == ["common answer", "middle answer"]
    assert lookup.write_corpus([], tmp_path / "none") is None


def test_a_saved_assistant_keeps_its_corpus_and_a_broken_one_is_skipped(saved_tiny, tmp_path, caplog):
    lookup.write_corpus(["<think>fine</think>", "<think>fine</think>", "a reply"], saved_tiny)
    assert json.loads((saved_tiny / lookup.CORPUS_FILE).read_text()) == {"answers": ["<think>fine</think>",
                                                                                       "a reply"]}
    AnomalyAssistant.from_pretrained(str(saved_tiny)).save_pretrained(str(tmp_path / "again"))
    kept = (tmp_path / "again" / lookup.CORPUS_FILE).read_text()
    assert kept == (saved_tiny / lookup.CORPUS_FILE).read_text()
    (saved_tiny / lookup.CORPUS_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="anomaly_assistant.lookup"):
        broken = AnomalyAssistant.from_pretrained(str(saved_tiny))
    assert broken.model.lookup_corpus is None and "ignoring lookup_corpus.json" in caplog.text
    assert broken.chat().inspect(_image(), max_new_tokens=4).raw_text is not None
    (saved_tiny / lookup.CORPUS_FILE).unlink()
