"""anomaly-assistant: visual inspection with a multimodal LLM and an anomaly expert.

Public API (imported lazily so `import anomaly_assistant` stays cheap):
`AnomalyAssistant`, `ChatSession`, `Finding`, `Box`, `Frame`, `parse_answer`, `render_answer`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# torch's OpenMP worker threads sleep between parallel regions instead of spin-waiting. Spinning threads fight
# any other busy process for the cores: on the 2-core CPU beside a training job, expert screening fell from
# about 20 to 1.2 images/s, and an inspection took 30 times longer; with sleeping workers screening stayed at
# 21.5 images/s. The OpenMP runtime reads this when torch loads, so it must be set before torch is imported
# (the command line always is); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
