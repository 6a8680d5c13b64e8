"""anomaly-assistant: visual inspection with a multimodal LLM and an anomaly expert.

Public API (imported lazily so `import anomaly_assistant` stays cheap):
`AnomalyAssistant`, `ChatSession`, `Finding`, `Box`, `Frame`, `parse_answer`, `render_answer`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AnomalyAssistant": "anomaly_assistant.assistant",
    "ChatSession": "anomaly_assistant.assistant",
    "Finding": "anomaly_assistant.finding",
    "Box": "anomaly_assistant.finding",
    "Frame": "anomaly_assistant.finding",
    "parse_answer": "anomaly_assistant.grammar",
    "render_answer": "anomaly_assistant.grammar",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anomaly_assistant' has no attribute {name!r}")
