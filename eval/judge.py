"""LLM judge on LLaVA's 1–10 scale ("GPT-score" in the VisA-D&R protocol).

The judge sees the question, the reference answer (Assistant 1) and the model's answer (Assistant 2),
rates both for helpfulness, relevance, accuracy and level of detail on 1–10, and writes the two scores
on its first line. This is LLaVA's review rule (`llava/eval/table/rule.json`, Apache-2.0) with the
image context replaced by what we know about the image (class, defect type): the judge never sees
pixels, exactly as in LLaVA-Bench and Anomaly-OV. We report the answer's score (what the Anomaly-OV
table shows), the reference's score and their ratio (LLaVA's relative score).

Backends: any OpenAI-compatible `/chat/completions` endpoint over stdlib HTTP (no SDK), or a local
transformers causal LM directory. Every review is cached on disk, keyed by backend, model, messages and
decoding settings, so re-running an evaluation never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image of an industrial product. "
    "For your reference, the visual content in the image is represented with a few sentences describing the "
    "image.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and "
    "2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)


def judge_messages(question: str, reference: str, answer: str, context: str = "") -> list[dict[str, str]]:
    """The chat messages sent to the judge (reference = Assistant 1, model answer = Assistant 2)."""
    content = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{JUDGE_RULE}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


_SCORE_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[ ,/]\s*(\d+(?:\.\d+)?)\s*$")


def parse_scores(review: str) -> tuple[float, float] | None:
    """The two 1–10 scores from the review's first non-empty line.

    None when that line is not exactly two numbers, so a malformed review is counted rather than guessed at.
    """
    for line in review.splitlines():
        if line.strip():
            m = _SCORE_LINE.match(line.replace("**", ""))
            if not m:
                return None
            a, b = float(m.group(1)), float(m.group(2))
            if not (0 <= a <= 10 and 0 <= b <= 10):
                return None
            return a, b
    return None


@dataclass
class JudgeScore:
    """One review: `answer_score` is the model's 1–10 score (None when the review did not parse)."""

    answer_score: float | None
    reference_score: float | None
    review: str
    cached: bool = False

    @property
    def relative(self) -> float | None:
        if self.answer_score is None or not self.reference_score:
            return None
        return self.answer_score / self.reference_score


@dataclass
class JudgeConfig:
    """Where the judge runs.

    `endpoint` (OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1) or `local_model` (a transformers
    causal-LM directory); the API key is read from the environment variable `api_key_env`.
    """

    endpoint: str | None = field(default=None, metadata={"help": "OpenAI-compatible base URL (…/v1)"})
    model: str = field(default="gpt-4o", metadata={"help": "model name sent to the endpoint"})
    local_model: str | None = field(default=None, metadata={"help": "local transformers causal-LM directory"})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"}
    )
    cache_dir: str = field(default="runs/judge-cache", metadata={"help": "on-disk cache of reviews"})
    temperature: float = field(default=0.2, metadata={"help": "LLaVA's review temperature"})
    max_tokens: int = field(default=1024, metadata={"help": "longest review"})
    timeout_s: float = field(default=120.0, metadata={"help": "HTTP timeout per request"})
    retries: int = field(default=3, metadata={"help": "HTTP attempts before giving up on one review"})


class Judge:
    """Base: caching and parsing; subclasses implement `_complete(messages) -> str`."""

    backend = "base"

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.calls = 0  # reviews actually requested (not served from the cache)

    def _model_id(self) -> str:
        return self.config.model

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps(
            {"backend": self.backend, "model": self._model_id(), "messages": messages,
             "temperature": self.config.temperature, "max_tokens": self.config.max_tokens},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def review(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """(review text, whether it came from the cache)."""
        key = self.cache_key(messages)
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["review"], True
        text = self._complete(messages)
        self.calls += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"review": text, "model": self._model_id(), "messages": messages},
                                  ensure_ascii=False),
                       encoding="utf-8")
        tmp.replace(path)  # atomic: parallel evaluation processes may share the cache
        return text, False

    def score(self, question: str, reference: str, answer: str, context: str = "") -> JudgeScore:
        text, cached = self.review(judge_messages(question, reference, answer, context))
        pair = parse_scores(text)
        if pair is None:
            return JudgeScore(None, None, text, cached)
        return JudgeScore(pair[1], pair[0], text, cached)

    def _complete(self, messages: list[dict[str, str]]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenAIJudge(Judge):
    """Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama…).

    Reviews are requested through `POST {endpoint}/chat/completions`.
    """

    backend = "openai"

    def _complete(self, messages: list[dict[str, str]]) -> str:
        cfg = self.config
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                           "max_tokens": cfg.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = cfg.endpoint.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        last: Exception | None = None
        for _ in range(max(1, cfg.retries)):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code < 500 and exc.code != 429:  # a client error will not fix itself
                    break
            except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as exc:
                last = exc
        raise RuntimeError(f"judge endpoint {url} failed: {last}")


class LocalJudge(Judge):
    """A local transformers causal LM.

    It uses its own chat template and greedy decoding, so local reviews are deterministic.
    """

    backend = "local"

    def __init__(self, config: JudgeConfig, device: str = "cpu"):
        super().__init__(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.local_model)
        self.model = AutoModelForCausalLM.from_pretrained(config.local_model).to(device).eval()
        self.device = device

    def _model_id(self) -> str:
        return str(Path(self.config.local_model).resolve())  # type: ignore[arg-type]

    def _complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=self.config.max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def build_judge(config: JudgeConfig) -> Judge | None:
    """The configured judge, or None when neither an endpoint nor a local model is given."""
    if config.local_model:
        return LocalJudge(config)
    if config.endpoint:
        return OpenAIJudge(config)
    return None


def config_dict(config: JudgeConfig) -> dict[str, Any]:
    """The judge settings that go into a report (never the key itself)."""
    return {k: v for k, v in asdict(config).items() if k != "api_key_env"}
