"""Every sub-command answers --help (or says plainly that it is not available yet)."""

from __future__ import annotations

import pytest

from anomaly_assistant import cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_for_every_subcommand(name, capsys):
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as exc:  # argparse's --help exits
        rc = exc.code
    out, err = capsys.readouterr()
    if rc == 2:
        assert "not available yet" in err, err
    else:
        assert rc == 0, (out, err)
        assert f"usage: anomaly-assistant {name}" in out, out


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["inspekt", "x.png"])
    assert exc.value.code == 2
    assert "unknown command 'inspekt'" in capsys.readouterr().err
