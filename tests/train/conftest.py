"""Fixtures for the training tests: one small `data build` output (SynthInspect only), written once."""

import pytest

from anomaly_assistant.data_builders.build import BuildConfig, build


@pytest.fixture(scope="session")
def data_build(tmp_path_factory):
    """A `data build` output folder (sft/, grpo/, ...): 12 SynthInspect images of 64 px, half anomalous."""
    import datasets

    datasets.disable_progress_bars()
    out = tmp_path_factory.mktemp("data_build")
    build(BuildConfig(out=str(out), synth=12, synth_size=64, progress=False, seed=3))
    return out


@pytest.fixture(scope="session")
def grpo_train(data_build):
    """The train split of the build's GRPO export, as `datasets.load_from_disk` gives it."""
    import datasets

    return datasets.load_from_disk(str(data_build / "grpo"))["train"]
