"""Helpers for the CLI tests (a uniquely named module: several test folders have a conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def json_lines(text: str) -> list[dict]:
    """Every non-empty stdout line must be one JSON object (nothing else is allowed on stdout with --json)."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter: `python -m anomaly_assistant.cli ARGS`."""
    return subprocess.run([sys.executable, "-m", "anomaly_assistant.cli", *map(str, args)], check=False,
                          input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO)
