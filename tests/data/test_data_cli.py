"""`anomaly-assistant data {build,inspect,synth}` through the real entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant.cli import main as top_main
from anomaly_assistant.data_builders.cli import main


@pytest.mark.parametrize("sub", [[], ["build"], ["inspect"], ["synth"]])
def test_help_on_every_subcommand(sub, capsys):
    assert top_main(["data", *sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert "anomaly-assistant data" in out
    if sub == ["build"]:
        assert "--source" in out and "--synth" in out and "--backbone" in out and "llava_onevision" in out


def test_unknown_subcommand_and_bad_values(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["build", "--backbone", "nope"]) == 2
    assert main(["build", "--out", "x"]) == 2  # nothing to build
    assert "nothing to build" in capsys.readouterr().err


def test_synth_build_inspect_end_to_end(tmp_path, capsys):
    synth = tmp_path / "synth"
    assert (
        main(
            [
                "synth",
                "--out",
                str(synth),
                "--n-train",
                "1",
                "--n-test",
                "3",
                "--size",
                "64",
                "--category",
                "nut",
                "pcb",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["images"] == 8 and (synth / "nut" / "train" / "good" / "000.png").is_file()

    config = tmp_path / "build.yaml"
    config.write_text(
        f"synth: 9\nsynth_size: 64\nseed: 3\nkinds: [inspect, detect]\nout: {tmp_path / 'ignored'}\n"
    )
    out = tmp_path / "built"
    rc = main(
        [
            "build",
            "--config",
            str(config),
            "--source",
            str(synth),
            "--out",
            str(out),
            "--backbone",
            "llava",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "split" in printed and "anomalous" in printed and "skipped 0 item(s)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["config"]["backbone"] == "llava" and summary["config"]["seed"] == 3
    )  # flags and YAML merged
    assert summary["config"]["kinds"] == ["inspect", "detect"]
    assert not (tmp_path / "ignored").exists()  # the flag beat the YAML
    assert sum(s["images"] for s in summary["splits"].values()) == 8 + 9

    grid = tmp_path / "grid.png"
    assert main(["inspect", str(out), "--grid", str(grid), "--n", "6"]) == 0
    printed = capsys.readouterr().out
    assert "17 images" in printed and "category:" in printed and "defect_type:" in printed
    arr = np.asarray(Image.open(grid).convert("RGB")).astype(int)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    assert red.sum() > 20  # boxes were drawn

    assert main(["inspect", f"mvtec:{synth}", "--grid", str(tmp_path / "g2.png")]) == 0
    assert "8 images" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1  # an input that is not there (commands.runtime)


def test_build_with_teacher_endpoint(tmp_path, monkeypatch, capsys):
    """--teacher rewrites through ANOMALY_TEACHER_*; without it configured the build still completes."""
    import threading
    from http.server import HTTPServer

    from test_data_conversations import _FakeOpenAI

    monkeypatch.delenv("ANOMALY_TEACHER_BASE_URL", raising=False)
    assert (
        main(
            [
                "build",
                "--synth",
                "3",
                "--synth-size",
                "64",
                "--kind",
                "inspect",
                "--out",
                str(tmp_path / "a"),
                "--teacher",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "not configured" in json.loads((tmp_path / "a" / "summary.json").read_text())["teacher"]
    _FakeOpenAI.calls = []
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ANOMALY_TEACHER_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        assert (
            main(
                [
                    "build",
                    "--synth",
                    "3",
                    "--synth-size",
                    "64",
                    "--kind",
                    "inspect",
                    "--out",
                    str(tmp_path / "b"),
                    "--teacher",
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        server.shutdown()
    stats = json.loads((tmp_path / "b" / "summary.json").read_text())["teacher"]
    assert stats["calls"] == 6 and stats["failed"] == 0  # think + rationale for 3 images
    conv = json.loads((tmp_path / "b" / "anomaly_instruct.json").read_text())
    assert all("Rewritten: " in c["conversations"][1]["value"] for c in conv)
