"""Few-shot fitting on the bundled good samples: deterministic by seed; saves, reloads, separates defects."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_assistant.data_builders.defects import synthesize
from anomaly_assistant.expert.fitted import FIT_NAME, Calibration, FittedExpert, build_source
from anomaly_assistant.expert.model import AnomalyExpert
from anomaly_assistant.resources import sample_images, sample_references
from anomaly_assistant.train.expert_fit import FitConfig, fit_expert

# tiny budget: 8 training views, 6 held-out views, 8 steps at 128 px (a real fit uses the defaults)
TINY = {
    "views": 8,
    "calibration_views": 6,
    "steps": 8,
    "batch_size": 6,
    "image_size": 128,
    "progress": False,
}


@pytest.fixture(scope="module")
def normals():
    return [Image.open(p).convert("RGB") for p in sample_references()]


@pytest.fixture(scope="module")
def source():
    from anomaly_assistant.expert.fitted import efficientnet_expert_config

    return build_source(efficientnet_expert_config(source_options={"image_size": 128}))


@pytest.fixture(scope="module")
def fitted(normals, source):
    return fit_expert(normals, FitConfig(**TINY, seed=0), source=source)


def _maps(fitted, images):
    return [r.anomaly_map for r in fitted.predict(images)]


def test_fit_is_deterministic_by_seed(fitted, normals, source):
    images = [Image.open(p).convert("RGB") for p in sample_images()]
    again = fit_expert(normals, FitConfig(**TINY, seed=0), source=source)
    assert fitted.info["steps_run"] == again.info["steps_run"] == TINY["steps"]
    assert fitted.calibration == again.calibration
    for a, b in zip(fitted.expert.state_dict().values(), again.expert.state_dict().values()):
        assert torch.equal(a, b)
    assert all(np.array_equal(a, b) for a, b in zip(_maps(fitted, images), _maps(again, images)))


def test_fitted_expert_saves_reloads_and_remembers(fitted, normals, source, tmp_path):
    images = [Image.open(p).convert("RGB") for p in sample_images()]
    fitted.save(tmp_path / "fit")
    info = json.loads((tmp_path / "fit" / FIT_NAME).read_text())
    assert info["k"] == 3 and len(info["references"]) == 3 and info["calibration"]["threshold"] > 0
    assert [f["size"] for f in info["fitted_on"]] == [list(im.size) for im in normals]
    loaded = FittedExpert.load(tmp_path / "fit", source=source)
    assert loaded.expert.is_trained and loaded.calibration == fitted.calibration
    for a, b in zip(fitted.predict(images), loaded.predict(images)):
        assert a.anomaly_map.shape == (images[0].size[1], images[0].size[0])
        assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score
    assert AnomalyExpert.from_pretrained(tmp_path / "fit").config.feature_source == "efficientnet_lite0"


def test_a_fit_saved_before_the_held_out_profile_keeps_the_bank_scale_it_was_calibrated_with(
        fitted, source, tmp_path):
    fitted.save(tmp_path / "fit")
    path = tmp_path / "fit" / FIT_NAME
    info = json.loads(path.read_text())
    assert info["screener"]["bank"]["held_out_profile"] is True
    del info["screener"]["bank"]["held_out_profile"]  # as written before the setting existed
    path.write_text(json.dumps(info))
    older = FittedExpert.load(tmp_path / "fit", source=source)
    assert older.screener.config.bank.held_out_profile is False
    assert older.screener.bank.tau < fitted.screener.bank.tau


def test_fitted_expert_separates_defects_from_normals(fitted):
    clean, scratch, stain = (Image.open(p).convert("RGB") for p in sample_images())
    planted = Image.fromarray(synthesize(clean, kind="hole", rng=5).image)
    r_clean, r_scratch, r_stain, r_planted = fitted.predict([clean, scratch, stain, planted])
    assert r_clean.score < min(r_scratch.score, r_stain.score, r_planted.score)
    assert not r_clean.label and r_scratch.label


def test_calibration_sends_the_fitted_threshold_to_one_half():
    cal = Calibration.fit([0.1, 0.2, 0.3], [0.5, 0.6])
    assert cal.threshold == pytest.approx(0.4)  # middle of the gap between the classes
    assert float(cal(cal.threshold)) == pytest.approx(0.5)
    assert float(cal(0.0)) == 0.0 and float(cal(1.0)) == 1.0
    x = torch.linspace(0, 1, 11)
    assert torch.all(cal(x)[1:] >= cal(x)[:-1])  # monotone: AUROC unchanged
    overlap = Calibration.fit([0.1, 0.5], [0.4, 0.9])
    assert 0.1 < overlap.threshold < 0.9


def test_assistant_screens_with_a_fitted_expert_and_no_references(fitted, tmp_path):
    from anomaly_assistant.assistant import AnomalyAssistant

    fitted.save(tmp_path / "fit")
    assistant = AnomalyAssistant.expert_only(expert=str(tmp_path / "fit"))
    clean, scratch = sample_images()[:2]
    a, b = assistant.screen([clean, scratch])
    assert a.verdict == "normal" and b.verdict == "anomalous" and b.boxes
    assert a.score == pytest.approx(fitted.predict([Image.open(clean).convert("RGB")])[0].score, abs=1e-6)
    assert "fitted expert" in b.map_source and not any("map source" in n for n in b.notes)
    session = assistant.chat()
    assert session.inspect(scratch).verdict == "anomalous"


def test_cli_expert_fit(tmp_path, capsys):
    from anomaly_assistant.cli import main

    assert main(["expert", "fit", "--out", str(tmp_path / "x")]) == 2  # no --normals: a usage error
    good = sample_references()[0].parent
    argv = [
        "expert",
        "fit",
        "--normals",
        str(good),
        "--out",
        str(tmp_path / "x"),
        "--views",
        "4",
        "--calibration-views",
        "2",
        "--steps",
        "2",
        "--image-size",
        "64",
        "--no-progress",
        "--minutes",
        "2",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("x")
    assert json.loads((tmp_path / "x" / FIT_NAME).read_text())["steps_run"] == 2
