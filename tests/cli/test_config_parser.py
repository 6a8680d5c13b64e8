"""The one config parser (`commands/config.py`): YAML + flags, switches, lists, sections, errors,
`--device auto`, and the same rules in the data, eval and bench commands."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from cli_helpers import REPO

from anomaly_assistant import cli
from anomaly_assistant.commands import _common
from anomaly_assistant.commands.config import ConfigParser, UsageError, parse_config, resolve_device
from anomaly_assistant.data_builders.build import BuildConfig
from anomaly_assistant.eval.bench import BenchConfig
from anomaly_assistant.eval.cli import ADConfig, MMADConfig, ReasoningConfig


@dataclass
class Section:
    endpoint: str | None = field(default=None, metadata={"help": "where"})
    retries: int = field(default=3, metadata={"help": "attempts"})


@dataclass
class Example:
    out: str = field(metadata={"help": "result path"})
    size: int = field(default=8, metadata={"help": "side"})
    mode: str = field(default="fast", metadata={"help": "how", "choices": ["fast", "exact"]})
    verbose: bool = field(default=False, metadata={"help": "talk more"})
    progress: bool = field(default=True, metadata={"help": "bars"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "names", "aliases": ["--name"]})
    ratios: list[float] = field(default_factory=list, metadata={"help": "ratios"})
    limit: int | None = field(default=None, metadata={"help": "at most"})
    remote: Section = field(default_factory=Section, metadata={"help": "remote settings"})


def parse(argv, tmp_path=None, yaml_text=None, cls=Example):
    if yaml_text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    return parse_config(cls, argv, "prog")


def test_defaults_yaml_and_flags_in_that_order(tmp_path):
    assert parse(["--out", "o"]) == Example(out="o")
    cfg = parse(["--size", "5", "--limit", "2"], tmp_path, "out: from-yaml\nsize: 3\nmode: exact\n")
    # the flag beat the YAML, the YAML beat the default
    assert (cfg.out, cfg.size, cfg.mode, cfg.limit) == ("from-yaml", 5, "exact", 2)
    assert parse(["--out=o", "--limit", "none"], tmp_path, "limit: 4\n").limit is None  # TRL's none sentinel
    with pytest.raises(UsageError, match="required: --out"):  # an empty YAML is allowed; --out is missing
        parse([], tmp_path, "")


def test_switches_on_and_off_in_every_spelling(tmp_path):
    base = ["--out", "o"]
    assert parse([*base, "--verbose", "--no-progress"]).verbose is True
    assert parse([*base, "--no-progress"]).progress is False
    assert parse([*base, "--no_progress"]).progress is False
    assert parse([*base, "--no-verbose"]).verbose is False
    yaml_on = parse([*base, "--no-verbose"], tmp_path, "verbose: true\nprogress: false\n")
    assert (yaml_on.verbose, yaml_on.progress) == (False, False)  # a flag switches off a YAML `true`
    # a switch takes no value: what follows is the next argument, not a boolean
    with pytest.raises(UsageError, match="unrecognized arguments: true"):
        parse([*base, "--verbose", "true"])
    with pytest.raises(UsageError, match="'verbose' must be true or false"):
        parse(base, tmp_path, "verbose: 'yes'\n")


def test_list_fields_from_yaml_and_command_line(tmp_path):
    base = ["--out", "o"]
    assert parse(base).names == ["a"]
    assert parse([*base, "--names", "b", "c", "--name", "d"]).names == ["b", "c", "d"]  # repeatable, alias
    assert parse([*base, "--ratios", "0.5", "2"]).ratios == [0.5, 2.0]
    assert parse(base, tmp_path, "names: [x, y]\nratios: [0.25]\n").names == ["x", "y"]
    assert parse([*base, "--name", "z"], tmp_path, "names: [x, y]\n").names == ["z"]  # flags replace YAML
    assert parse(base, tmp_path, "names: solo\n").names == ["solo"]  # a YAML scalar is a one-item list


def test_sections_from_flags_and_yaml(tmp_path):
    cfg = parse(["--out", "o", "--remote-retries", "5"], tmp_path, "remote:\n  endpoint: http://x/v1\n")
    assert cfg.remote == Section(endpoint="http://x/v1", retries=5)
    assert parse(["--out", "o"], tmp_path, "remote_retries: 1\n").remote.retries == 1


@pytest.mark.parametrize("yaml_text, message", [
    ("out: o\nnmes: [b]\n", "unknown key 'nmes' (did you mean 'names'?)"),
    ("out: o\nremote: {endpont: x}\n", "unknown key 'remote_endpont'"),
    ("out: o\nmode: slow\n", "'mode' cannot be 'slow' (choose from fast, exact)"),
    ("- out\n", "expected a mapping"),
    ("out: [\n", "not valid YAML"),
])
def test_bad_yaml_is_a_usage_error_naming_the_key(tmp_path, yaml_text, message):
    with pytest.raises(UsageError) as exc:
        parse([], tmp_path, yaml_text)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_required_fields_and_choices_on_the_command_line(tmp_path):
    with pytest.raises(UsageError, match="the following arguments are required: --out"):
        parse(["--size", "3"])
    assert parse([], tmp_path, "out: o\n").out == "o"  # the YAML may supply a required field
    with pytest.raises(UsageError, match="invalid choice: 'slow'"):
        parse(["--out", "o", "--mode", "slow"])
    with pytest.raises(UsageError, match="no such file|No such file"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_each_option_once_with_its_default_once(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--size SIZE side (default: 8)" in out
    assert "--progress, --no-progress bars (default: True)" in out
    assert "--names, --name NAMES [NAMES ...] names (default: a)" in out
    assert "--no_progress" not in out and "--remote_retries" not in out  # they parse, but are not listed


def test_trl_configs_parse_by_the_same_rules(tmp_path):
    """The coming train stages can read TRL's own configs (TrainingArguments fields) with this parser."""
    from trl import ModelConfig, SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: tiny\nuse_peft: true\nlora_target_modules: [q_proj, v_proj]\n"
                    "learning_rate: 1.0e-4\n")
    model, sft = ConfigParser([ModelConfig, SFTConfig], prog="train").parse(
        ["--config", str(path), "--output-dir", str(tmp_path / "o"), "--per_device_train_batch_size", "2",
         "--no-use-peft", "--no-bf16", "--use_cpu", "--report-to", "none"])
    assert (model.model_name_or_path, model.use_peft) == ("tiny", False)
    assert model.lora_target_modules == ["q_proj", "v_proj"]
    assert (sft.learning_rate, sft.per_device_train_batch_size) == (1e-4, 2)
    assert (sft.bf16, sft.use_cpu) == (False, True)


def test_device_auto_is_the_one_default_and_resolves_once():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="unknown --device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")
    inspect_parser = argparse.ArgumentParser()
    _common.add_model_arguments(inspect_parser)
    defaults = {
        "inspect/chat": inspect_parser.parse_args([]).device,
        "eval": parse_config(ADConfig, ["--out", "o", "--data", "d", "--category", "c"], "eval ad").device,
        "bench": parse_config(BenchConfig, ["--out", "o"], "bench").device,
    }
    assert set(defaults.values()) == {"auto"}, defaults


def test_eval_configs_use_switches_sections_and_required_fields(tmp_path):
    path = tmp_path / "mmad.yaml"
    path.write_text("out: r.json\ndata: mmad.json\nexpert_only: true\nreference: false\n")
    cfg = parse_config(MMADConfig, ["--config", str(path), "--no-expert-only"], "eval mmad")
    assert (cfg.out, cfg.expert_only, cfg.reference) == ("r.json", False, False)
    zero_shot = parse_config(MMADConfig, ["--out", "o", "--data", "d", "--no-reference"], "eval mmad")
    assert zero_shot.reference is False
    path.write_text("out: r.json\ndata: dr.json\njudge: {endpoint: 'http://127.0.0.1:1/v1'}\n")
    cfg = parse_config(ReasoningConfig, ["--config", str(path), "--judge-model", "m"], "eval reasoning")
    assert (cfg.judge.endpoint, cfg.judge.model) == ("http://127.0.0.1:1/v1", "m")
    build = parse_config(BuildConfig, ["--source", "a", "--source", "b", "--kind", "inspect"], "data build")
    assert (build.sources, build.kinds) == (["a", "b"], ["inspect"])


def _one_line_usage_error(argv, capsys, needle):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["data", "synth"], ["eval", "ad"], ["bench"]])
def test_every_command_reports_an_unknown_yaml_key_in_one_line(command, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("out: x\nbogus_key: 1\n")
    _one_line_usage_error([*command, "--config", str(path)], capsys, "unknown key 'bogus_key'")


@pytest.mark.parametrize("argv, needle", [
    (["data", "synth", "--size", "big"], "invalid int value: 'big'"),
    (["eval", "ad", "--out", "o", "--data", "d", "--category", "c", "--model", "tiny", "--device", "gpu"],
     "unknown --device 'gpu'"),
    (["bench", "--out", "o", "--device", "gpu"], "unknown --device 'gpu'"),
])
def test_every_command_reports_a_bad_value_in_one_line(argv, needle, capsys):
    _one_line_usage_error(argv, capsys, needle)


def test_data_inspect_path_is_a_required_positional(capsys):
    _one_line_usage_error(["data", "inspect"], capsys, "required: PATH")


def test_help_never_repeats_a_default(capsys):
    commands = (["data", "build"], ["data", "inspect"], ["data", "synth"], ["eval", "ad"], ["eval", "detect"],
                ["eval", "reasoning"], ["eval", "mmad"], ["bench"])
    for argv in commands:
        try:
            cli.main([*argv, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"usage: anomaly-assistant {' '.join(argv)}" in out
        assert not re.search(r"\(default[^)]*\)\s*\(default", out), (argv, out)


def test_top_level_help_imports_no_parser_or_model_stack():
    code = ("import sys; from anomaly_assistant import cli; cli.main(['--help']); "
            "print(sorted(m for m in ('trl', 'transformers', 'torch', 'yaml') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
