"""Every command's errors, as a newcomer meets them: exit 2 for a usage error, 1 for an input or data error,
one line on stderr naming the file and the reason, no traceback unless -v; -q prints results only.

Each bad argument below once printed a traceback, exited 0 having done nothing, or exited 2 after 28 s of hub
retries (issue 16). Commands run in-process through the real entry point (`cli.main`) unless the process
environment matters (offline mode), where a fresh interpreter runs them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO
from PIL import Image, ImageDraw

from anomaly_assistant import cli

TRAIN_SFT_TINY = REPO / "configs" / "sft_tiny.yaml"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, *needles: str) -> str:
    """Exactly one non-empty stderr line, no traceback, containing every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    """ROOT/part/{train/good (3 images), test/good, test/dent}: the smallest MVTec-layout category."""
    root = tmp_path_factory.mktemp("mvtec")
    for sub, n in (("train/good", 3), ("test/good", 2), ("test/dent", 2)):
        (root / "part" / sub).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (64, 64), (120 + 10 * i, 120, 120))
            if "dent" in sub:
                ImageDraw.Draw(img).ellipse((20, 20, 40, 40), fill=(20, 20, 20))
            img.save(root / "part" / sub / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory, sample_paths) -> Path:
    """A folder of images with no labels (no good/ or defect sub-folders): what a newcomer tries first."""
    folder = tmp_path_factory.mktemp("flat")
    for name in ("clean", "scratch", "stain"):
        shutil.copy(sample_paths[name], folder / f"{name}.png")
    return folder


# ---------------------------------------------------------------------------------------- eval ad


def test_eval_ad_unknown_category_is_a_usage_error_listing_the_categories(mvtec, tmp_path, capsys):
    rc, out, err = run(
        capsys,
        "eval",
        "ad",
        "--data",
        mvtec,
        "--category",
        "bottle",
        "--expert-only",
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 2 and out == ""
    assert_one_line(err, "unknown --category 'bottle'", f"{mvtec} has part")
    assert not (tmp_path / "r.json").exists()


def test_eval_ad_without_data_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run(
        capsys, "eval", "ad", "--category", "part", "--expert-only", "--out", tmp_path / "r.json"
    )
    assert rc == 2
    assert_one_line(err, "--data", "(see --help)")


def test_eval_ad_on_missing_data_is_an_input_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_root"
    rc, _, err = run(
        capsys,
        "eval",
        "ad",
        "--data",
        missing,
        "--category",
        "part",
        "--expert-only",
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 1
    assert_one_line(err, f"--data {missing}: no such file or folder")


@pytest.mark.parametrize(
    "shots, needle",
    [
        ("0", "--shots must be at least 1"),
        ("1000", "has only 3 normal images (use --shots 1..3)"),
    ],
)
def test_eval_ad_shots_the_data_cannot_give_is_a_usage_error(shots, needle, mvtec, tmp_path, capsys):
    rc, _, err = run(
        capsys,
        "eval",
        "ad",
        "--data",
        mvtec,
        "--category",
        "part",
        "--expert-only",
        "--shots",
        shots,
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 2
    assert_one_line(err, needle)


def test_eval_ad_on_a_category_folder_points_at_its_parent(mvtec, tmp_path, capsys):
    data = mvtec / "part"
    rc, _, err = run(
        capsys,
        "eval",
        "ad",
        "--data",
        data,
        "--category",
        "part",
        "--expert-only",
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 1
    assert_one_line(err, f"pass --data {mvtec} --category part")


def test_verbose_adds_the_traceback(tmp_path, capsys):
    rc, _, err = run(
        capsys,
        "eval",
        "ad",
        "-v",
        "--data",
        tmp_path / "nowhere",
        "--category",
        "part",
        "--expert-only",
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].endswith("no such file or folder")


def test_eval_ad_quiet_prints_the_result_only(mvtec, tmp_path, capsys):
    rc, out, err = run(
        capsys,
        "eval",
        "ad",
        "-q",
        "--data",
        mvtec,
        "--category",
        "part",
        "--shots",
        "2",
        "--expert-only",
        "--batch-size",
        "4",
        "--out",
        tmp_path / "r.json",
    )
    assert rc == 0, err
    assert err == ""
    (line,) = out.splitlines()
    assert '"image_auroc"' in line and (tmp_path / "r.json").is_file()


# ---------------------------------------------------------------------------------------- eval detect


@pytest.mark.parametrize("layout", ["flat", "category_test_folder"])
def test_eval_detect_on_a_folder_in_the_wrong_layout_is_an_input_error(
    layout, flat_folder, mvtec, tmp_path, capsys
):
    data = flat_folder if layout == "flat" else mvtec / "part" / "test"
    rc, out, err = run(
        capsys, "eval", "detect", "--data", data, "--expert-only", "--out", tmp_path / "d.json"
    )
    assert rc == 1 and out == ""
    assert_one_line(err, f"--data {data}: no test images found", "MVTec-layout root")
    assert not (tmp_path / "d.json").exists()


# ------------------------------------------------------------------------------- eval reasoning, mmad


@pytest.mark.parametrize("sub", ["reasoning", "mmad"])
def test_eval_on_a_missing_json_is_an_input_error(sub, tmp_path, capsys):
    missing = tmp_path / "dialogues.json"
    rc, _, err = run(capsys, "eval", sub, "--data", missing, "--model", "tiny", "--out", tmp_path / "r.json")
    assert rc == 1
    assert_one_line(err, f"--data {missing}: no such file or folder")


def test_eval_with_nothing_to_evaluate_exits_1_without_a_report(tmp_path, capsys):
    empty = tmp_path / "mmad.json"
    empty.write_text("{}")
    rc, out, err = run(
        capsys, "eval", "mmad", "-q", "--data", empty, "--model", "tiny", "--out", tmp_path / "r.json"
    )
    assert rc == 1 and out == ""
    assert_one_line(err, f"--data {empty}: nothing to evaluate (0 items read)")
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------- data


def test_data_build_from_a_missing_source_is_an_input_error(tmp_path, capsys):
    rc, _, err = run(capsys, "data", "build", "--source", "/nonexistent", "--out", tmp_path / "out")
    assert rc == 1
    assert_one_line(err, "--source /nonexistent: no such file or folder")
    assert not (tmp_path / "out").exists()  # nothing written


def test_data_build_on_a_flat_folder_says_how_to_sort_it(flat_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "data", "build", "--source", flat_folder, "--out", tmp_path / "out")
    assert rc == 1
    assert_one_line(err, f"--source {flat_folder}: 3 images sit directly in the folder", "ROOT/good/")
    assert not (tmp_path / "out").exists()


def test_data_inspect_of_a_flat_folder_is_an_input_error(flat_folder, capsys):
    rc, _, err = run(capsys, "data", "inspect", flat_folder)
    assert rc == 1
    assert_one_line(err, f"{flat_folder}: no images found")


def test_data_build_with_nothing_to_build_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run(capsys, "data", "build", "--out", tmp_path / "out")
    assert rc == 2
    assert_one_line(err, "nothing to build")


def test_data_synth_unknown_category_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run(capsys, "data", "synth", "--category", "nope", "--out", tmp_path / "synth")
    assert rc == 2
    assert_one_line(err, "invalid choice: 'nope'", "'bottle'")
    assert not (tmp_path / "synth").exists()


def test_data_synth_bad_value_is_one_line(capsys):
    rc, _, err = run(capsys, "data", "synth", "--n-train", "many")
    assert rc == 2
    assert_one_line(err, "'many'")


# ---------------------------------------------------------------------------------------- models


def fresh(*argv: str, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    """The entry point in a new interpreter, `env` changed (None unsets; offline mode is read at import)."""
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "anomaly_assistant.cli", *map(str, argv)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=environ,
    )


def test_offline_hub_id_fails_at_once_naming_the_local_path_way(sample_paths):
    t0 = time.perf_counter()
    proc = fresh(
        "inspect", sample_paths["scratch"], "--model", "someorg/some-vlm", env={"HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 1, proc.stderr
    assert_one_line(
        proc.stderr,
        "someorg/some-vlm is a Hugging Face hub id and needs the network",
        "HF_HUB_OFFLINE",
        "--model DIR",
    )
    assert "Retrying" not in proc.stderr and proc.stdout == ""
    assert time.perf_counter() - t0 < 120  # interpreter start-up on a busy machine; no 5 hub retries


def test_online_hub_id_that_cannot_load_fails_after_one_try(sample_paths):
    """Without network (this sandbox) the one metadata request fails; with network the id is not found."""
    online = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}
    proc = fresh("inspect", sample_paths["scratch"], "--model", "someorg/no-such-vlm-4f2a", env=online)
    assert proc.returncode == 1, proc.stderr
    line = assert_one_line(proc.stderr, "--model someorg/no-such-vlm-4f2a")
    assert "could not reach the Hugging Face hub" in line or "not found" in line
    assert "Retrying" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{image}"],
        ["chat", "{image}"],
        ["eval", "ad", "--data", "{mvtec}", "--category", "part", "--shots", "2", "--out", "{tmp}/r.json"],
        ["serve", "--db", "{tmp}/records.sqlite"],
    ],
)
def test_a_missing_checkpoint_folder_is_an_input_error(command, sample_paths, mvtec, tmp_path, capsys):
    argv = [a.format(image=sample_paths["scratch"], mvtec=mvtec, tmp=tmp_path) for a in command]
    rc, _, err = run(capsys, *argv, "--model", "./checkpoints/missing")
    assert rc == 1
    assert_one_line(err, "--model ./checkpoints/missing: no such checkpoint folder")


# ---------------------------------------------------------------------------------------- inspect


def test_inspect_recursive_descends_into_folders(sample_paths, capsys):
    root = sample_paths["good"].parent  # samples/{good,test}/*.png
    rc, _, err = run(capsys, "inspect", "-q", root, "--expert-only", "--references", sample_paths["good"])
    assert rc == 1  # -q keeps errors
    assert_one_line(err, f"{root}: directory has no images (its subfolders do: add --recursive)")
    rc, out, err = run(
        capsys, "inspect", "-q", "--recursive", "--expert-only", "--references", sample_paths["good"], "--",
        root
    )
    assert rc == 0, err
    names = sorted(Path(line.split()[0]).name for line in out.splitlines())
    assert names == ["clean.png", "good_1.png", "good_2.png", "good_3.png", "scratch.png", "stain.png"]


def test_inspect_quiet_prints_only_the_result_lines(sample_paths, capsys):
    rc, out, err = run(capsys, "inspect", "-q", sample_paths["scratch"], "--expert-only", "--references",
                       sample_paths["good"])
    assert rc == 0
    assert err == ""  # no note, no "Loaded pretrained weights", no summary
    (line,) = out.splitlines()
    assert line.startswith(f"{sample_paths['scratch']}  ANOMALOUS  score 0.")
    assert "1 region: (" in line and line.endswith("compared with 3 reference images")
    assert "map source" not in line and "type -" not in line


def test_chat_quiet_prints_the_finding_only(sample_paths, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    scratch, good = sample_paths["scratch"], sample_paths["good"]
    rc, out, err = run(
        capsys, "chat", "-q", scratch, "--model", "tiny", "--max-new-tokens", "4", "--references", good
    )
    assert rc == 0 and err == ""
    (line,) = out.splitlines()
    assert line.startswith(f"{scratch}  ") and "compared with 3 reference images" in line


def test_inspect_default_output_has_one_note_per_long_step_and_a_summary(sample_paths, capsys):
    rc, out, err = run(capsys, "inspect", sample_paths["clean"], "--expert-only", "--references",
                       sample_paths["good"])
    assert rc == 0
    assert "fitting the expert to 3 reference images" in err and "Loaded pretrained" not in out + err
    assert out.splitlines()[-1] == "1 image inspected: 0 anomalous, 1 normal"


def test_inspect_threads(sample_paths, capsys):
    before = torch.get_num_threads()
    try:
        rc, out, err = run(
            capsys, "inspect", "--threads", "1", sample_paths["stain"], "--expert-only", "--references",
            sample_paths["good"]
        )
        assert rc == 0, err
        assert torch.get_num_threads() == 1
        assert "ANOMALOUS" in out
    finally:
        torch.set_num_threads(before)
    rc, out, err = run(
        capsys, "inspect", "--threads", "0", sample_paths["stain"], "--expert-only", "--references",
        sample_paths["good"]
    )
    assert rc == 2 and out == ""
    assert_one_line(err, "--threads must be at least 1")


def test_inspect_argparse_errors_are_one_line(capsys):
    rc, _, err = run(capsys, "inspect", "x.png", "--batch-size", "many")
    assert rc == 2
    assert_one_line(err, "--batch-size", "'many'", "(see --help)")


# ---------------------------------------------------------------------------------------- train


def test_train_input_error_is_one_line(tmp_path, capsys):
    rc, _, err = run(
        capsys,
        "train",
        "sft",
        "--config",
        TRAIN_SFT_TINY,
        "--data",
        tmp_path / "nowhere",
        "--out",
        tmp_path / "out",
    )
    assert rc == 1
    assert_one_line(err, str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------- every command


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["chat"],
        ["data", "build"],
        ["data", "inspect"],
        ["data", "synth"],
        ["eval", "ad"],
        ["eval", "detect"],
        ["eval", "reasoning"],
        ["eval", "mmad"],
        ["bench"],
        ["train", "sft"],
        ["train", "grpo"],
    ],
)
def test_every_command_offers_quiet_and_verbose(argv, capsys):
    try:  # argparse exits from --help; the data and train dispatchers return its code
        rc = cli.main([*argv, "--help"])
    except SystemExit as exc:
        rc = exc.code
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "-q, --quiet" in out and "-v, --verbose" in out, out


def test_an_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["inspekt", "x.png"])
    assert exc.value.code == 2
    assert_one_line(capsys.readouterr().err, "unknown command 'inspekt'", "inspect", "(see --help)")


def test_quiet_before_the_command_applies_to_it(sample_paths, capsys):
    rc, out, err = run(
        capsys, "-q", "inspect", "--expert-only", "--references", sample_paths["good"], "--",
        sample_paths["clean"]
    )
    assert rc == 0 and err == ""
    assert len(out.splitlines()) == 1 and "NORMAL" in out


@pytest.mark.parametrize("flag, value, named", [("--reference-patch-size", "0", "patch_size"),
                                                ("--reference-blur-sigma", "-1", "blur_sigma"),
                                                ("--reference-image-size", "0", "image_size"),
                                                ("--score-views", "rot90", "score_views")])
def test_export_default_refuses_bad_reference_matching_before_writing(capsys, tmp_path, flag, value, named):
    run_dir, out = tmp_path / "run", tmp_path / "parts"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"expert": {}}')
    rc, _, err = run(capsys, "train", "export-default", "--run", run_dir, "--out", out, flag, value)
    assert rc == 1
    assert_one_line(err, flag, named)
    assert not out.exists()
