"""Shared inputs for the CLI tests: the bundled samples and a folder of broken inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly_assistant.resources import sample_images, sample_references, samples_dir


@pytest.fixture(scope="session")
def samples() -> Path:
    return samples_dir()


@pytest.fixture(scope="session")
def sample_paths() -> dict[str, Path]:
    """Bundled test images by stem (clean, scratch, stain) plus the references under 'good'."""
    out: dict = {p.stem: p for p in sample_images()}
    out["good"] = samples_dir() / "good"
    assert len(sample_references()) == 3
    return out


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """A 0-byte PNG, a text file named .png, a path that does not exist."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("not an image, just text\n")
    return {"empty": d / "empty.png", "text": d / "notes.png", "missing": d / "missing.png"}

