"""`anomaly-assistant chat`: inspection first, then questions from a pipe, streamed answers, in-chat
commands."""

from __future__ import annotations

import io
import json

import pytest
from cli_helpers import run_cli

from anomaly_assistant.commands import chat as chat_cmd

FINDING_KEYS = {
    "image", "verdict", "score", "boxes", "defect_type", "rationale", "parse_error", "notes", "source",
    "map_source",
}


def _json_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def test_chat_through_a_pipe(sample_paths):
    """Two questions, /finding, /quit; the /finding after /quit must never run."""
    script = "What is the defect?\n/finding\nWhere exactly is it?\n/reset\n/quit\n/finding\n"
    proc = run_cli("chat", sample_paths["scratch"], "--model", "tiny", "--max-new-tokens", "8",
                   "--references", sample_paths["good"], stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{sample_paths['scratch']}  ")  # the inspection's Finding comes first
    assert "> " not in proc.stdout.splitlines()[1:2]  # no prompt when stdin is not a terminal
    rows = _json_rows(proc.stdout)
    assert len(rows) == 1, proc.stdout  # exactly one /finding answered: /quit stopped the loop
    finding = rows[0]
    assert FINDING_KEYS <= set(finding)
    assert finding["image"] == str(sample_paths["scratch"])
    assert f"score {finding['score']:.3f}" in first and finding["verdict"].upper() in first
    assert "(conversation reset" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def tiny_session(sample_paths):
    args = chat_cmd.build_parser().parse_args([str(sample_paths["clean"]), "--model", "tiny",
                                               "--max-new-tokens", "6"])
    return chat_cmd._start(args)


def test_every_question_sees_the_history_and_reset_clears_it(tiny_session):
    session, finding = tiny_session
    assert len(session.turns) == 2  # the inspection prompt and its answer
    out = io.StringIO()
    chat_cmd.converse(session, finding, io.StringIO("first question\nsecond question\n"), out)
    assert [t.role for t in session.turns] == ["user", "assistant"] * 3
    assert [t.text for t in session.turns[2::2]] == ["first question", "second question"]
    answers = [t.text for t in session.turns[3::2]]
    # streamed pieces add up to the recorded replies
    assert out.getvalue() == "".join(a + "\n" for a in answers)
    chat_cmd.converse(session, finding, io.StringIO("/reset\n\n/bogus\n"), io.StringIO())
    assert session.turns == []
    chat_cmd.converse(session, finding, io.StringIO("after reset\n"), io.StringIO())
    assert [t.text for t in session.turns[::2]] == ["after reset"]


def test_without_model_chat_uses_the_default_and_says_when_it_is_missing(sample_paths, capsys, monkeypatch,
                                                                          tmp_path):
    from anomaly_assistant import default_model

    monkeypatch.setattr(default_model, "SHIPPED_DIR", tmp_path)  # an installation without the trained parts
    assert chat_cmd.main([str(sample_paths["scratch"]), "--references", str(sample_paths["good"])]) == 1
    err = capsys.readouterr().err
    assert "no trained default model" in err and "--expert-only" in err and "Traceback" not in err


def test_chat_on_an_unreadable_image_exits_1(bad_inputs, capsys):
    assert chat_cmd.main([str(bad_inputs["empty"]), "--model", "tiny"]) == 1
    assert "empty file" in capsys.readouterr().err


@pytest.mark.parametrize("threshold, verdict", [("0", "ANOMALOUS"), ("1", "NORMAL")])
def test_threshold_flag_changes_the_printed_verdict(threshold, verdict, sample_paths, monkeypatch, capsys):
    """The tiny model does not write the grammar, so the expert's calibrated score (in (0, 1)) decides."""
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    rc = chat_cmd.main([str(sample_paths["scratch"]), "--model", "tiny", "--max-new-tokens", "4",
                        "--threshold", threshold, "--references", str(sample_paths["good"])])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(f"{sample_paths['scratch']}  {verdict} ")
    assert ("region" not in out) == (verdict == "NORMAL")


def test_a_bad_threshold_exits_2_before_loading(sample_paths, capsys):
    assert chat_cmd.main([str(sample_paths["scratch"]), "--model", "tiny", "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "anomaly-assistant chat: --threshold must be a calibrated score in [0, 1], got 2.0\n"
