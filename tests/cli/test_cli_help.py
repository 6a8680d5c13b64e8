"""Every advertised sub-command answers --help; commands not in this version are neither listed nor
accepted."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.metadata import version

import pytest

from anomaly_assistant import cli


@pytest.mark.parametrize("name", list(cli.available_commands()))
def test_help_for_every_subcommand(name, capsys):
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as exc:  # argparse's --help exits
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 0, (out, err)
    assert f"usage: anomaly-assistant {name}" in out, out


def test_top_level_help_lists_only_shipped_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in cli.COMMANDS.items():
        shipped = importlib.util.find_spec(module) is not None
        assert (f"    {name} " in out) == shipped, (name, out)
    assert {"inspect", "chat", "data", "eval", "bench"} <= set(cli.available_commands())


def test_unshipped_command_is_neither_listed_nor_accepted(monkeypatch, capsys):
    missing = ("anomaly_assistant.no_such_module", "not in this version")
    monkeypatch.setitem(cli.COMMANDS, "frobnicate", missing)
    cli.available_commands.cache_clear()
    try:
        assert cli.main(["--help"]) == 0
        assert "frobnicate" not in capsys.readouterr().out
        with pytest.raises(SystemExit) as exc:
            cli.main(["frobnicate"])
        assert exc.value.code == 2
        assert "unknown command 'frobnicate'" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        cli.available_commands.cache_clear()


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["inspekt", "x.png"])
    assert exc.value.code == 2
    assert "unknown command 'inspekt'" in capsys.readouterr().err


def test_version():
    proc = subprocess.run(
        [sys.executable, "-m", "anomaly_assistant.cli", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"anomaly-assistant {version('anomaly-assistant')}"
