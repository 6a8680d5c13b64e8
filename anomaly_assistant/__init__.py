"""anomaly-assistant: visual inspection with a multimodal LLM and an anomaly expert.

Public API (imported lazily so `import anomaly_assistant` stays cheap):
`AnomalyAssistant`, `ChatSession`, `Finding`, `Box`, `Frame`, `parse_answer`, `render_answer`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# torch's OpenMP worker threads (libgomp) spin only briefly before they sleep between parallel regions.
# Their default spinning fights any other busy process for the cores: on the 2-core CPU beside a training
# job, expert screening fell from about 30 to 1.2 images/s and an inspection took 30 times longer. Measured
# on that CPU (screening with two CPU-bound competitors, idle / default-model inspection with none): spin
# count 300000 (libgomp's default) 1.2-2.3 images/s busy; 10000: 11.2 busy, 28.5 idle, 7.5 s per inspection;
# 0 (passive): 15.2 busy, 30.4 idle, but 11.0 s per inspection (the language model's many small steps wake
# the workers each time); always spinning: 1.7 busy, 43.9 idle, 6.6 s. The runtime reads this when torch
# loads, so it is set before torch is imported (the command line always is); the user's OMP_WAIT_POLICY or
# GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
