"""The one command-line config parser: one dataclass per command, `--config FILE.yaml`, flags win.

Every command (data, eval, bench, and the training / serving stages) describes its options as one dataclass
whose fields carry `help` metadata (optionally `choices`, `metavar`, `aliases`) and reads them with
`parse_config`. Precedence: command-line flags > `--config` YAML > field defaults. A field without a default
is required (on the command line or in the YAML).

The parser is TRL's `TrlParser`, i.e. transformers' `HfArgumentParser` (types, Optional, Literal/Enum
choices, list fields, required fields, `--field_name` and `--field-name` spellings) plus YAML values as
defaults, so TRL's own configs (`SFTConfig`, `GRPOConfig`, `ModelConfig`) parse by the same rules as ours.
What it lacks is added here:

- Booleans are plain switches, `--flag` / `--no-flag` (also `--no_flag`), for every bool field.
  HfArgumentParser's `--flag [BOOL]` takes an optional value, so `--json part.png` would read the path as a
  boolean, and it offers `--no_flag` only for fields that default to True (a YAML `true` could not be switched
  off by a flag).
- List fields take several values and may be repeated (`--source a b --source c`); the command line replaces a
  YAML list instead of appending to it.
- A field may be positional (`metadata={"positional": True}`).
- A field whose type is a dataclass is a section: flags `--judge-endpoint`, YAML `judge: {endpoint: ...}` or
  `judge_endpoint: ...` (HfArgumentParser would need two dataclasses whose equal field names collide).
- YAML keys are checked: an unknown key, a value outside `choices` or a non-boolean for a switch is a usage
  error naming the key (TrlParser raises a ValueError listing leftover `--key value` strings).
- Usage errors raise `UsageError` with a one-line message (the command exits 2), not the usage block.
- `-q/--quiet` and `-v/--verbose` on every command (`commands.runtime` applies them).
- `--help` lists each option once, hyphenated, with its default once (argparse's ArgumentDefaultsHelpFormatter
  appends "(default: …)" even where the help text already gives one).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from trl import TrlParser

from anomaly_assistant.commands.runtime import UsageError, add_verbosity_arguments

__all__ = ["DEVICE_HELP", "ConfigParser", "UsageError", "parse_config", "resolve_device"]

ConfigT = TypeVar("ConfigT")

DEVICE_HELP = "torch device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


def resolve_device(device: str | None = "auto") -> str:
    """The device every command runs on: `auto` (or None) is CUDA when available, else CPU.

    Other names are checked here, so a typo or a missing GPU is a usage error before any model loads.
    """
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise UsageError(f"unknown --device {device!r}; {DEVICE_HELP}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    return device


def parse_config(
    config_class: type[ConfigT], argv: Sequence[str], prog: str, description: str | None = None
) -> ConfigT:
    """One config from `argv` (flags > `--config` YAML > defaults). Raises UsageError; `--help` exits 0."""
    (config,) = ConfigParser([config_class], prog=prog, description=description).parse(argv)
    return config


class ConfigParser(TrlParser):
    """`TrlParser` with the rules in the module docstring; `parse(argv)` gives one instance per dataclass."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        super().__init__(dataclass_types=None, formatter_class=_HelpFormatter, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="YAML file whose keys are any of the options below (flags override it)",
        )
        self.sections: set[str] = set()  # dest prefixes of nested dataclass fields, e.g. "judge_"
        self.dataclass_types = list(dataclass_types)
        for dtype in self.dataclass_types:
            self._add_dataclass_arguments(dtype)
        # -q / -v (applied by commands.runtime.run_command before parsing) unless a config field owns the name
        self.verbosity_dests = add_verbosity_arguments(self)

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see --help)")

    def parse(self, argv: Sequence[str]) -> tuple[Any, ...]:
        argv = list(argv)
        config_path = _config_path(argv)
        if config_path:
            self._apply_config(config_path)
        values = vars(self.parse_args(argv))
        for key in ("config", *self.verbosity_dests):
            values.pop(key)
        try:
            return tuple(self._build(dtype, values) for dtype in self.dataclass_types)
        except ValueError as exc:  # a config's own check (__post_init__)
            raise UsageError(str(exc)) from exc

    # ------------------------------------------------------------------------------------------ building

    def _add_dataclass_arguments(self, dtype: type, prefix: str = "", group: Any = None) -> None:
        """One argument per field; the fields of a dataclass-typed field get `<name>_` and a help group.

        Works on copies of the fields: HfArgumentParser writes resolved types into the class's own fields.
        """
        if group is None:
            group = (
                self.add_argument_group(dtype._argument_group_name)
                if hasattr(dtype, "_argument_group_name")
                else self
            )
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                section = f"{prefix}{f.name}_"
                self.sections.add(section)
                flags = f"--{section.replace('_', '-')}*"
                title = f"{f.name} options ({flags}, or a `{f.name}:` mapping in the YAML)"
                sub = self.add_argument_group(title, f.metadata.get("help"))
                self._add_dataclass_arguments(hints[f.name], section, sub)
                continue
            flat = copy.copy(f)
            flat.name, flat.type = prefix + f.name, hints[f.name]
            self._add_field(group, flat)

    def _add_field(self, group: Any, f: dataclasses.Field) -> None:
        meta = dict(f.metadata)
        default = _default(f)
        if meta.pop("positional", False):
            group.add_argument(
                f.name,
                nargs=None if default is dataclasses.MISSING else "?",
                default=None if default is dataclasses.MISSING else default,
                metavar=meta.get("metavar", f.name.upper()),
                help=meta.get("help"),
            )
        elif f.type is bool or f.type == bool | None:
            hyphen = f.name.replace("_", "-")
            on = list(dict.fromkeys([f"--{hyphen}", f"--{f.name}", *_aliases(meta)]))
            off = list(dict.fromkeys([f"--no-{hyphen}", f"--no_{f.name}"]))
            group.add_argument(
                *on,
                *off,
                action=_Switch,
                negatives=off,
                dest=f.name,
                help=meta.get("help"),
                default=None if default is dataclasses.MISSING else default,
                required=default is dataclasses.MISSING,
            )
        else:
            if _is_list(f.type):
                meta["action"] = _ListAction
            flat = copy.copy(f)
            flat.metadata = types.MappingProxyType(meta)
            self._parse_dataclass_field(group, flat)
            # HfArgumentParser lists `--field_name` first: the hyphenated spelling leads in usage and errors
            self._actions[-1].option_strings.sort(key=lambda s: "_" in s)

    def _build(self, dtype: type, values: dict[str, Any], prefix: str = "") -> Any:
        hints = typing.get_type_hints(dtype)
        kwargs = {}
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = self._build(hints[f.name], values, f"{prefix}{f.name}_")
            else:
                kwargs[f.name] = values[prefix + f.name]
        return dtype(**kwargs)

    # ------------------------------------------------------------------------------------------ YAML

    def _apply_config(self, path: str) -> None:
        """The YAML's values become the parser's defaults (TrlParser's way), after checking every key."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--config {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: expected a mapping of option names to values")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if f"{key}_" in self.sections and isinstance(value, dict):
                flat.update({f"{key}_{sub}": v for sub, v in value.items()})
            else:
                flat[str(key)] = value
        skip = {"help", "config", *self.verbosity_dests}
        actions = {a.dest: a for a in self._actions if a.dest not in skip}
        for key, value in flat.items():
            if key not in actions:
                close = difflib.get_close_matches(key, actions, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
            action = actions[key]
            if isinstance(action, _ListAction) and not isinstance(value, list):
                flat[key] = value = [value]
            if isinstance(action, _Switch) and not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key!r} must be true or false, not {value!r}")
            items = value if isinstance(action, _ListAction) else [value]
            bad = [v for v in items if action.choices and v not in action.choices]
            if bad:
                choices = ", ".join(map(str, action.choices))
                raise UsageError(f"--config {path}: {key!r} cannot be {bad[0]!r} (choose from {choices})")
        self.set_defaults_with_config(**flat)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _aliases(meta: dict[str, Any]) -> list[str]:
    aliases = meta.get("aliases", [])
    return [aliases] if isinstance(aliases, str) else list(aliases)


def _is_list(tp: Any) -> bool:
    args = (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType)
        else [tp]
    )
    return len(args) == 1 and typing.get_origin(args[0]) is list


class _Switch(argparse.Action):
    """`--flag` stores True, `--no-flag` / `--no_flag` stores False."""

    def __init__(self, option_strings: list[str], dest: str, negatives: Sequence[str] = (), **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negatives = set(negatives)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        return " | ".join(s for s in self.option_strings if "_" not in s)


class _ListAction(argparse.Action):
    """`--x a b --x c` gives [a, b, c]; the first use replaces the default (or the YAML list)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, ([] if current is self.default else list(current)) + list(values))


class _HelpFormatter(argparse.HelpFormatter):
    """Each option once (its hyphenated spellings; `--field_name` forms still parse) and its default once."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = ", ".join(s for s in action.option_strings if "_" not in s) or action.option_strings[0]
        if action.nargs == 0:
            return names
        return f"{names} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (
            "default" in text
            or action.required
            or default is None
            or default is False
            or default == ""
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"
