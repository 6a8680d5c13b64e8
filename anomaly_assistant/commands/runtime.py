"""What every command shares when it runs: `-q` / `-v`, exit codes, one-line errors, model sources.

Exit codes, the same for every command:

- 0: done, and something was done (an empty result is an error unless the user asked for it);
- 1: an input or data problem (`InputError`): the message names the file and the reason;
- 2: a usage error (`UsageError`): the message says what to pass instead;
- 130: interrupted.

Errors are one line on stderr, never a traceback unless `-v`. `-q` leaves the results only (no notes, progress
bars or warnings); `-v` adds debug logs and the traceback of any error. The verbosity is process state set
once per command (`run_command`), like the logging configuration it drives; libraries never read it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
QUIET, NORMAL, VERBOSE = -1, 0, 1

_verbosity = NORMAL


class UsageError(Exception):
    """A command line that cannot run; the message says what to pass instead (exit code 2)."""


class InputError(Exception):
    """An input the command cannot use (exit code 1): a missing file, a wrong layout, a model that won't load.

    The message names the file and the reason, so the user knows what to fix without a traceback.
    """


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """`-q/--quiet` and `-v/--verbose` (read early by `run_command`; declared so help lists them).

    A config that has its own `quiet` / `verbose` option keeps it. Returns the dests added.
    """
    taken = {s for a in parser._actions for s in a.option_strings}
    dests = {a.dest for a in parser._actions}
    group = parser.add_mutually_exclusive_group()
    added = []
    for flags, dest, help_text in (
        (("-q", "--quiet"), "quiet", "print results only: no notes, progress or warnings"),
        (("-v", "--verbose"), "verbose", "debug logs, and the traceback of any error"),
    ):
        free = [f for f in flags if f not in taken]
        if free and dest not in dests:
            group.add_argument(*free, dest=dest, action="store_true", help=help_text)
            added.append(dest)
    return added


def verbosity_of(argv: Sequence[str]) -> int:
    """QUIET, NORMAL or VERBOSE from `argv` (options after `--` are paths, not flags)."""
    level = NORMAL
    for arg in argv:
        if arg == "--":
            break
        if arg in ("-q", "--quiet"):
            level = QUIET
        elif arg in ("-v", "--verbose"):
            level = VERBOSE
    return level


def is_quiet() -> bool:
    """`-q` is in effect: print results only."""
    return _verbosity == QUIET


def is_verbose() -> bool:
    """`-v` is in effect: debug logs and tracebacks."""
    return _verbosity == VERBOSE


def note(message: str) -> None:
    """A line for the person watching (progress, what was assumed): stderr, dropped by `-q`."""
    if _verbosity > QUIET:
        print(message, file=sys.stderr, flush=True)


def error(message: str) -> None:
    """An error line: stderr, always shown, always one line."""
    print(one_line(message), file=sys.stderr, flush=True)


def one_line(text: object) -> str:
    """`text` with its whitespace runs (newlines included) collapsed: library errors span several lines."""
    return " ".join(str(text).split())


# Read by transformers when a command imports it later (an already imported one is set in `_library_logging`).
_ENV_QUIET = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_ENV_VERBOSE = {"TRANSFORMERS_VERBOSITY": "info"}


@contextlib.contextmanager
def verbosity(level: int) -> Iterator[None]:
    """Apply `level` for one command (logging, warnings, progress bars) and restore everything afterwards.

    Restoring matters in-process (tests, notebooks): a `-q` run must not silence the next command.
    """
    global _verbosity
    env = _ENV_QUIET if level == QUIET else _ENV_VERBOSE if level == VERBOSE else {}
    saved_env = {k: os.environ.get(k) for k in env}
    root = logging.getLogger()
    ours = logging.getLogger("anomaly_assistant")
    saved_level, saved_ours, saved_verbosity = root.level, ours.level, _verbosity
    handler = None
    os.environ.update(env)
    _verbosity = level
    with warnings.catch_warnings(), _no_progress_bars(level == QUIET), _library_logging(level):
        if level == QUIET:
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)
        elif level == VERBOSE:  # our debug logs; other libraries' INFO (their DEBUG is byte-level noise)
            root.setLevel(logging.INFO)
            ours.setLevel(logging.DEBUG)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
        try:
            yield
        finally:
            _verbosity = saved_verbosity
            root.setLevel(saved_level)
            ours.setLevel(saved_ours)
            if handler is not None:
                root.removeHandler(handler)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _no_progress_bars(active: bool) -> Iterator[None]:
    """Every tqdm bar created inside is disabled (`-q`).

    tqdm reads TQDM_DISABLE only when it is imported, and the libraries (ours, transformers, datasets,
    accelerate) create their bars from their own code, so the one switch that reaches all of them is tqdm's
    constructor; it is put back on exit.
    """
    if not active:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def _library_logging(level: int) -> Iterator[None]:
    """The log level of an already imported transformers follows -q / -v (it reads its env at import)."""
    if level == NORMAL or "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    saved = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.ERROR if level == QUIET else hf_logging.INFO)
    try:
        yield
    finally:
        hf_logging.set_verbosity(saved)


def run_command(prog: str, argv: Sequence[str], body: Callable[[], int | None]) -> int:
    """Run one command's `body` under the verbosity its `argv` asks for and turn exceptions into exit codes.

    UsageError -> 2, InputError (and OSError, ValueError from reading inputs) -> 1, Ctrl-C -> 130, anything
    else -> 1; each prints one line naming the command (and the traceback with `-v`).
    """
    level = verbosity_of(argv)
    with verbosity(level):
        try:
            return int(body() or 0)  # `--help` raises SystemExit(0), as argparse does
        except UsageError as exc:
            _traceback_if_verbose()
            error(f"{prog}: {exc}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            error("interrupted")
            return EXIT_INTERRUPTED
        except InputError as exc:
            _traceback_if_verbose()
            error(f"{prog}: error: {exc}")
            return EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
            _traceback_if_verbose()
            hint = "" if level == VERBOSE else " (run again with -v for the traceback)"
            error(f"{prog}: error: {type(exc).__name__}: {one_line(exc)}{hint}")
            return EXIT_FAILED


def dispatch(argv: Sequence[str], prog: str, description: str, choices: dict[str, str],
             run_one: Callable[[str, list[str]], int | None], noun: str = "sub-command") -> int:
    """`prog NAME ...` for a command with sub-commands (data, eval, train): the one place that lists them.

    No name or `-h` prints the list; an unknown name is a one-line usage error (exit 2); otherwise
    `run_one(name, rest)` runs under `run_command`, so every sub-command gets the same exit codes and
    verbosity.
    """
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog=prog, description=description)
        sub = parser.add_subparsers(metavar=noun.upper().replace("-", ""))
        for name, help_text in choices.items():
            sub.add_parser(name, help=help_text, add_help=False)
        parser.print_help()
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in choices:
        error(f"{prog}: unknown {noun} {name!r}; choose from {', '.join(choices)}")
        return EXIT_USAGE
    return run_command(f"{prog} {name}", rest, lambda: run_one(name, rest))


def _traceback_if_verbose() -> None:
    if _verbosity == VERBOSE:
        traceback.print_exc(file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# Models: fail at once, with the way out, when a hub id cannot be reached
# ------------------------------------------------------------------------------------------------------------
LOCAL_HINT = "download it where there is network (`hf download {id} --local-dir DIR`) and pass --model DIR"


def check_model_source(path_or_id: str) -> None:
    """Raise InputError now if `from_pretrained(path_or_id)` can only fail, not after minutes of retries.

    `tiny` / `tiny:<family>` and existing local paths pass. Something that looks like a path (`./x`, `/x`,
    `~/x`) and does not exist is named as a missing folder. A hub id passes when its config is in the local
    cache; otherwise, in offline mode (`HF_HUB_OFFLINE=1`) it fails at once saying it needs the network, and
    online it gets one metadata request (no retries) whose failure is the error.
    """
    if path_or_id == "tiny" or path_or_id.startswith("tiny:"):
        return
    path = Path(path_or_id).expanduser()
    if path.exists():
        return
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or "\\" in path_or_id:
        raise InputError(f"--model {path_or_id}: no such checkpoint folder")
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(path_or_id, "config.json")
    except HFValidationError:
        raise InputError(f"--model {path_or_id}: no such checkpoint folder, and not a valid hub id") from None
    if isinstance(cached, str):
        return
    hint = LOCAL_HINT.format(id=path_or_id)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.is_offline_mode():  # the constant is read once, at import
        raise InputError(
            f"--model {path_or_id} is a Hugging Face hub id and needs the network, but "
            f"HF_HUB_OFFLINE is set and it is not in the local cache; {hint}"
        )
    try:
        model_info(path_or_id, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        kind = "gated (log in with `hf auth login`)" if isinstance(exc, GatedRepoError) else "not found"
        raise InputError(f"--model {path_or_id}: no such local folder, and the hub id is {kind}") from None
    except Exception as exc:  # noqa: BLE001 - any network failure: say so once, without retrying
        raise InputError(
            f"--model {path_or_id}: could not reach the Hugging Face hub ({one_line(exc)}); {hint}"
        ) from None


DEFAULT_MODEL_NAME = "the embedded default model (SmolLM2-135M + EfficientNet-Lite0)"


def load_model(model: str | None, device: str, without_model: str, **kwargs: Any) -> Any:
    """A command's `AnomalyAssistant.from_pretrained(model, device=device, **kwargs)` (None: the default).

    One clear InputError (exit 1) per cause: a missing folder or unreachable hub id (`check_model_source`, at
    once), a checkpoint that does not load, or the default model's package missing; `without_model` says what
    the command can do instead (e.g. "serve the expert alone: --expert-only"). Library chatter while loading
    goes to stderr, so stdout stays machine-readable.
    """
    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.default_model import DefaultModelUnavailable

    if model is not None:
        check_model_source(model)
    note(f"loading {model or DEFAULT_MODEL_NAME} on {device} ...")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return AnomalyAssistant.from_pretrained(model, device=device, **kwargs)
    except DefaultModelUnavailable as exc:
        raise InputError(f"{exc}; or {without_model}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"could not load model {model!r}: {one_line(exc)}") from exc
