"""Suite-wide settings: offline, quiet, and one intra-op thread per xdist worker (2 workers on 2 cores).

Also the one home of the real development data (`REAL_DEV`): magnetic tiles, DeepPCB boards and ELPV cells,
licensed for research only, so they are not in the repository. Tests reach it through the `real_dev` fixture,
which skips with a reason that names the folder it looked for and how to provide it (`pytest -ra` lists it).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `import anomaly_assistant` does, before torch loads

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

REAL_DEV_ENV = "ANOMALY_ASSISTANT_REAL_DEV"
# Default: ../shared/data/real-dev next to the checkout (where the development machines keep it).
REAL_DEV = Path(
    os.environ.get(REAL_DEV_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dev"
).resolve()


@pytest.fixture(scope="session")
def real_dev_root() -> Path:
    """The real-dev folder, whether or not it exists (for tests that only add real images when present)."""
    return REAL_DEV


@pytest.fixture(scope="session")
def real_dev():
    """`real_dev("magnetic_tile")` -> that folder under REAL_DEV, or a skip naming where it looked and how."""

    def need(name: str = "") -> Path:
        path = REAL_DEV / name
        if not path.is_dir():
            pytest.skip(
                f"real-dev data not found: {path} is missing; set {REAL_DEV_ENV}=/path/to/real-dev "
                "(the folder holding magnetic_tile/, deeppcb/, elpv/) or put it at ../shared/data/real-dev"
            )
        return path

    return need
