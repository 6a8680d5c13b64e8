"""`anomaly-assistant inspect` end to end: expert-only screening of the bundled samples, a tiny model,
bad inputs, usage errors, interruption. Runs the real entry point (`cli.main`) in-process; stdout and
stderr are checked apart."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from cli_helpers import json_lines
from PIL import Image

from anomaly_assistant import cli
from anomaly_assistant.commands import _common
from anomaly_assistant.commands import inspect as inspect_cmd
from anomaly_assistant.finding import VERDICTS, Box, Finding

KEYS = {
    "image", "verdict", "score", "boxes", "defect_type", "rationale", "parse_error", "notes", "source",
    "map_source",
}
# Where make_samples.py draws the defects on the 160² crops: the scratch's line and the stain's disc
# (x1, y1, x2, y2).
SCRATCH_BOX = Box(40, 48, 120, 104)
STAIN_CENTRE = (80, 88)


def run_main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["inspect", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def expert_run(sample_paths, tmp_path_factory):
    """Expert-only JSON screening of samples/test against samples/good, overlays saved (the `make run`
    command)."""
    maps = tmp_path_factory.mktemp("maps")
    test_dir = sample_paths["clean"].parent
    rc, out, err = run_main(
        "--json", "--expert-only", "--save-maps", maps, "--references", sample_paths["good"], "--", test_dir
    )
    return rc, json_lines(out), err, maps


def test_expert_only_screens_bundled_samples(expert_run):
    rc, rows, err, _ = expert_run
    assert rc == 0, err
    by_stem = {row["image"].rsplit("/", 1)[-1].removesuffix(".png"): row for row in rows}
    assert set(by_stem) == {"clean", "scratch", "stain"}
    for row in rows:
        assert KEYS <= set(row), set(row)
        assert "anomaly_map" not in row and "error" not in row
        assert row["source"] == "expert" and row["rationale"] == "" and row["parse_error"] is None
        assert row["map_source"] == "reference" and not any("map source" in n for n in row["notes"])
    assert by_stem["clean"]["verdict"] == "normal" and by_stem["clean"]["boxes"] == []
    assert by_stem["scratch"]["verdict"] == "anomalous" and by_stem["stain"]["verdict"] == "anomalous"
    assert by_stem["clean"]["score"] < 0.5 < min(by_stem["scratch"]["score"], by_stem["stain"]["score"])
    # the boxes sit on the planted defects
    assert max(Box(*b).iou(SCRATCH_BOX) for b in by_stem["scratch"]["boxes"]) > 0.5
    x1, y1, x2, y2 = by_stem["stain"]["boxes"][0]
    assert x1 <= STAIN_CENTRE[0] <= x2 and y1 <= STAIN_CENTRE[1] <= y2
    assert "3 images inspected: 2 anomalous, 1 normal" in err  # the summary goes to stderr with --json


def test_saved_overlays_show_map_and_boxes(expert_run, sample_paths):
    _, rows, _, maps = expert_run
    assert sorted(p.name for p in maps.iterdir()) == ["clean_map.png", "scratch_map.png", "stain_map.png"]
    row = next(r for r in rows if r["image"].endswith("scratch.png"))
    overlay = np.asarray(Image.open(row["map_path"])).astype(int)
    plain = Image.open(sample_paths["scratch"]).convert("RGB")
    assert plain.size == (160, 160)
    header, scale = 34, 384 / 160  # overlay.render_overlay enlarges small images to 384 px and adds a header
    assert overlay.shape == (384 + header, 384 + 96, 3)  # + the colour-bar panel
    assert overlay[15, 9, 0] > 150 and overlay[15, 9, 1] < 80  # red ANOMALOUS badge
    part = overlay[header:, :384]
    shown = np.asarray(plain.resize((384, 384), Image.NEAREST)).astype(int)
    x1, y1, x2, y2 = (round(v * scale) for v in row["boxes"][0])
    edge = part[y1 - 1:y1 + 3, x1 + 8:x2 - 8]  # the box's top edge is drawn in white (within a pixel of y1)
    assert any((row == 255).all() for row in edge)
    heat_inside = np.abs(part[y1 + 8:y2 - 8, x1 + 8:x2 - 8] - shown[y1 + 8:y2 - 8, x1 + 8:x2 - 8]).mean()
    heat_corner = np.abs(part[:40, :40] - shown[:40, :40]).mean()
    assert heat_inside > heat_corner + 10


def test_expert_only_screening_skips_bad_inputs_and_reports_each(sample_paths, bad_inputs):
    rc, out, err = run_main(
        bad_inputs["empty"],
        sample_paths["scratch"],
        bad_inputs["text"],
        bad_inputs["missing"],
        "--expert-only",
        "--references",
        sample_paths["good"],
    )
    assert rc == 1
    assert "Traceback" not in err
    assert f"{bad_inputs['empty']}: empty file" in err
    assert f"{bad_inputs['text']}: not a readable image" in err
    assert f"{bad_inputs['missing']}: no such file" in err
    lines = out.splitlines()
    assert len(lines) == 2, out  # one line for the readable image, one summary line
    assert lines[0].startswith(f"{sample_paths['scratch']}  ANOMALOUS")
    assert float(re.search(r"score (\d\.\d+)", lines[0]).group(1)) >= 0.5
    assert "1 region: (" in lines[0] and "compared with 3 reference images" in lines[0]
    assert lines[1] == "1 image inspected: 1 anomalous, 0 normal; 3 inputs failed"


def test_tiny_model_json_schema_with_bad_inputs(sample_paths, bad_inputs):
    """A random tiny model cannot answer in the grammar: the Finding records the parse error and falls back
    to the expert's reference-matching verdict; broken inputs come out as {image, error} objects."""
    rc, out, err = run_main(
        "--json", "--model", "tiny", "--max-new-tokens", "12",
        sample_paths["scratch"],
        bad_inputs["empty"],
        bad_inputs["text"],
        bad_inputs["missing"],
        sample_paths["clean"],
        "--references", sample_paths["good"],
    )
    assert rc == 1, err
    rows = json_lines(out)
    errors = {r["image"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {str(p) for p in bad_inputs.values()}
    findings = [r for r in rows if "error" not in r]
    assert [r["image"] for r in findings] == [str(sample_paths["scratch"]), str(sample_paths["clean"])]
    for row in findings:
        assert KEYS <= set(row)
        assert row["verdict"] in VERDICTS
        assert all(len(b) == 4 for b in row["boxes"])
        assert row["parse_error"] is None or isinstance(row["parse_error"], str)
        if row["parse_error"]:  # fell back to the expert: its verdict follows the calibrated score
            assert row["source"] == "expert"
            assert row["verdict"] == ("anomalous" if row["score"] >= 0.5 else "normal")
        Finding.from_json(row)  # the line round-trips into the library type
    assert "Loaded pretrained" not in out
    assert "2 images inspected" in err and "3 inputs failed" in err


@pytest.mark.parametrize("args, message", [
    ([], "no IMAGE given"),
    (["--references", "good", "part.png"], "put IMAGE... first"),
    (["part.png", "--expert-only"], "--expert-only needs --references"),
    (["part.png", "--expert-only", "--model", "tiny", "--references", "good"], "drop --model"),
])
def test_usage_errors_exit_2_and_say_what_to_pass(args, message):
    rc, out, err = run_main(*args)
    assert rc == 2 and out == ""
    assert message in err


def test_unreadable_references_are_a_usage_error(bad_inputs, sample_paths):
    rc, _, err = run_main(sample_paths["clean"], "--expert-only", "--references", bad_inputs["empty"],
                          bad_inputs["text"])
    assert rc == 2
    assert "none of the --references could be read" in err and "empty file" in err


def test_ctrl_c_exits_130(sample_paths, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "load_assistant", interrupted)
    rc, _, err = run_main(sample_paths["clean"], "--expert-only", "--references", sample_paths["good"])
    assert rc == 130 and "interrupted" in err


def test_the_line_puts_the_map_source_in_words():
    def line(**kw):
        return _common.format_finding(Finding(verdict="anomalous", score=0.8, **kw), "x.png", references=3)

    assert line(source="expert", map_source="reference").endswith("  compared with 3 reference images")
    assert line(source="expert", map_source="ltfm+reference").endswith(
        "  judged by the trained expert and compared with 3 reference images")
    fitted = "fitted expert (trained LTFM fused with reference matching)"  # FittedExpert.map_source
    assert line(source="expert", map_source=fitted).endswith(f"  map source: {fitted}")  # shown as it is
    # the model decided: its map's source is not what judged the part
    assert line(source="model", map_source="ltfm").endswith(
        "  no region marked  compared with 3 reference images")
    assert "map source" not in line(source="expert")


def test_json_line_survives_unicode_line_separators():
    text = "crack\u2028left edge\x85and\nbelow, é"
    line = _common.json_line({"rationale": text})
    assert len(line.splitlines()) == 1 and "é" in line
    assert json.loads(line) == {"rationale": text}


def test_threshold_flag_moves_verdicts_and_boxes_together(expert_run, sample_paths):
    """Thresholds around the default run's scores flip the clean part to ANOMALOUS, the scratch to NORMAL."""
    scores = {row["image"].rsplit("/", 1)[-1]: row["score"] for row in expert_run[1]}
    rc, out, err = run_main("--json", "--threshold", scores["clean.png"] / 2, sample_paths["clean"],
                            "--expert-only", "--references", sample_paths["good"])
    assert rc == 0, err
    (row,) = json_lines(out)
    assert row["score"] == pytest.approx(scores["clean.png"], abs=1e-4)
    assert row["verdict"] == "anomalous" and row["boxes"]
    rc, out, err = run_main("--threshold", (1 + scores["scratch.png"]) / 2, sample_paths["scratch"],
                            "--expert-only", "--references", sample_paths["good"])
    assert rc == 0, err
    assert out.startswith(f"{sample_paths['scratch']}  NORMAL") and "region" not in out


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_threshold_outside_0_1_exits_2_with_one_line(value, sample_paths):
    rc, out, err = run_main("--threshold", value, sample_paths["scratch"], "--expert-only", "--references",
                            sample_paths["good"])
    assert rc == 2 and out == ""
    expected = f"anomaly-assistant inspect: --threshold must be a calibrated score in [0, 1], got {value}"
    assert err.strip() == expected


def test_inspect_with_a_fitted_expert_needs_no_references(sample_paths, tmp_path):
    from PIL import Image

    from anomaly_assistant.resources import sample_references
    from anomaly_assistant.train.expert_fit import FitConfig, fit_expert

    normals = [Image.open(p).convert("RGB") for p in sample_references()]
    config = FitConfig(views=8, calibration_views=6, steps=8, batch_size=6, image_size=128, progress=False)
    fit_expert(normals, config).save(tmp_path / "fit")
    rc, out, err = run_main("--json", "--expert", tmp_path / "fit", sample_paths["scratch"],
                            sample_paths["clean"])
    assert rc == 0, err
    rows = {row["image"].rsplit("/", 1)[-1]: row for row in json_lines(out)}
    assert rows["scratch.png"]["verdict"] == "anomalous" and rows["scratch.png"]["source"] == "expert"
    assert rows["clean.png"]["verdict"] == "normal"
    rc, out, err = run_main("--expert", tmp_path, sample_paths["scratch"])  # not a fitted-expert folder
    assert rc == 1 and out == "" and "no fit.json" in err and "Traceback" not in err
