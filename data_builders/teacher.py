"""Optional teacher LLM that rewrites templated rationales and answers via an OpenAI-compatible endpoint.

Configured from the environment: `ANOMALY_TEACHER_BASE_URL` (e.g. http://localhost:8000/v1),
`ANOMALY_TEACHER_API_KEY` (may be empty for local servers) and `ANOMALY_TEACHER_MODEL`. Every reply is cached
on disk (one JSON file per request hash), so a rebuild costs nothing and runs offline. A failed or empty call
returns the templated text unchanged (and is counted), so the templated path always completes on its own.
The teacher only rewrites wording: the facts it is given (verdict, defect type, location) are the ground
truth.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEM = (
    "You rewrite short texts written by an industrial visual-inspection assistant. Keep every fact exactly "
    "(verdict, defect type, location, numbers); vary the wording, be concrete and concise; reply with the "
    "rewritten text only, no tags, no preamble."
)
PROMPTS = {
    "think": "Rewrite this step-by-step inspection reasoning in at most three sentences:",
    "rationale": "Rewrite this one-sentence inspection rationale:",
    "describe": "Rewrite this description of the inspected image:",
    "low_level": "Rewrite this answer about what and where the defect is:",
    "complex": "Rewrite and, if useful, enrich with one more concrete detail this answer about the defect's "
    "cause, effect or prevention:",
}


@dataclass
class Teacher:
    """A client for the teacher endpoint with an on-disk reply cache, so rebuilds are free and run offline."""

    base_url: str
    model: str
    api_key: str = ""
    cache_dir: Path = Path.home() / ".cache" / "anomaly-assistant" / "teacher"
    timeout_s: float = 60.0
    temperature: float = 0.7
    stats: dict[str, int] = field(default_factory=lambda: {"calls": 0, "cached": 0, "failed": 0})

    @classmethod
    def from_env(cls, cache_dir: str | Path | None = None) -> Teacher | None:
        """A teacher from ANOMALY_TEACHER_* variables, or None when no base URL is set."""
        base = os.environ.get("ANOMALY_TEACHER_BASE_URL", "").strip()
        if not base:
            return None
        t = cls(
            base_url=base.rstrip("/"),
            model=os.environ.get("ANOMALY_TEACHER_MODEL", "gpt-4o-mini"),
            api_key=os.environ.get("ANOMALY_TEACHER_API_KEY", ""),
        )
        if cache_dir is not None:
            t.cache_dir = Path(cache_dir)
        return t

    def _key(self, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def complete(self, messages: list[dict[str, str]]) -> str | None:
        """One chat completion (cached). None on any failure."""
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature}
        path = Path(self.cache_dir) / f"{self._key(payload)}.json"
        if path.is_file():
            try:
                self.stats["cached"] += 1
                return json.loads(path.read_text())["text"]
            except (ValueError, KeyError, OSError):
                pass
        req = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        )
        self.stats["calls"] += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read().decode())
            text = data["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
            self.stats["failed"] += 1
            return None
        if not text:
            self.stats["failed"] += 1
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"text": text, "request": payload}))
        tmp.replace(path)
        return text

    def __call__(self, kind: str, text: str, facts: dict[str, Any]) -> str:
        """The `conversations.RewriteFn` interface: rewritten text, or `text` itself if the teacher fails."""
        fact_text = ", ".join(f"{k}={v}" for k, v in sorted(facts.items()) if v not in (None, ""))
        messages = [
            {"role": "system", "content": SYSTEM},
            {
                "role": "user",
                "content": f"{PROMPTS.get(kind, PROMPTS['rationale'])}\n\nFacts: {fact_text}\n\nText: {text}",
            },
        ]
        out = self.complete(messages)
        if not out:
            return text
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            out = out.replace(tag, "")
        return out.strip() or text
