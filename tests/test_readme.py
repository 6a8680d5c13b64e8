"""The README's examples run: every ```python block, and every ```console block's `$ ` commands.

Conventions (README.md):
- ```python blocks are executed, each in a fresh namespace, in a temporary working directory.
- ```console blocks hold `$ command` lines, each followed by the output it printed when the README was
  written. Each command runs with bash in a temporary directory that looks like the repository root for
  reading (it holds a link to `anomaly_assistant/`, so `anomaly_assistant/resources/samples/...` resolves) and
  takes what the command writes. It must exit 0, and every expected output line must appear in the real
  output, in order, compared loosely: whitespace collapsed, decimals (scores, timings) match any number,
  whole numbers (counts) must be equal; a line `...` matches anything; a line ending in ` ...` needs only its
  beginning.
- `<!-- skip: reason -->` on the line before a block skips it with that reason (servers, network, GPUs, long
  runs). ```bash blocks are illustrations and are not run.
A README command that breaks (renamed flag, removed sub-command, changed output) fails this test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->\s*$")
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")  # decimals: scores and timings vary a little by machine


@dataclass
class Block:
    lang: str
    text: str
    line: int
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.lang}@L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        lang = m.group(1)
        if lang not in ("python", "console"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append(Block(lang, m.group(2), line, skip.group(1) if skip else None))
    return blocks


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)]; a command line ending in `\\` continues on the next line."""
    steps: list[tuple[str, list[str]]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + " " + next(lines).strip()
            steps.append((cmd, []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def _pattern(expected: str) -> re.Pattern:
    """One expected line as a regex: words and whole numbers exact, any whitespace, decimals any number."""
    parts, pos = [], 0
    norm = " ".join(expected.split())
    if norm.endswith(" ..."):
        norm = norm[:-4]
    for m in NUMBER.finditer(norm):
        parts.append(re.escape(norm[pos : m.start()]).replace(r"\ ", r"\s+"))
        parts.append(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
        pos = m.end()
    parts.append(re.escape(norm[pos:]).replace(r"\ ", r"\s+"))
    return re.compile("".join(parts))


def check_output(expected: list[str], actual: str) -> list[str]:
    """The expected lines (in order) that no line of `actual` at or after the previous match matches."""
    got = [" ".join(x.split()) for x in actual.splitlines()]
    missing, i = [], 0
    for line in expected:
        if not line.strip() or line.strip() == "...":
            continue
        pat = _pattern(line)
        j = next((k for k in range(i, len(got)) if pat.search(got[k])), None)
        if j is None:
            missing.append(line)
        else:
            i = j + 1
    return missing


def test_the_runner_catches_a_broken_command(tmp_path):
    """The checks this test relies on: a failing command and a changed output are both caught."""
    expected = "3 images inspected: 2 anomalous, 1 normal"
    assert check_output([expected], "3 images inspected: 1 anomalous, 2 normal") == [expected]
    assert not check_output(["a  score 0.760"], "a score 0.812")
    assert check_output(["ANOMALOUS score 0.760"], "NORMAL score 0.760") == ["ANOMALOUS score 0.760"]
    assert not check_output(['{"a": 1.5, ...'], '{"a": 2.25, "b": 3}')
    assert check_output(["first", "second"], "second\nfirst") == ["second"]  # order counts
    steps = console_steps("$ anomaly-assistant inspect \\\n  --nope\nusage: x\n")
    assert steps == [("anomaly-assistant inspect  --nope", ["usage: x"])]
    assert _run(steps[0][0], tmp_path).returncode == 2


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "anomaly_assistant").symlink_to(ROOT / "anomaly_assistant", target_is_directory=True)
    return work


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """One README command; stdout and stderr interleaved as on a terminal (unbuffered, one stream)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="80",
               PYTHONUNBUFFERED="1")
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900, check=False)


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_examples():
    langs = [b.lang for b in BLOCKS if not b.skip]
    assert langs.count("python") >= 1 and langs.count("console") >= 3, langs


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    work = _workdir(tmp_path)
    if block.lang == "python":
        monkeypatch.chdir(work)
        code = compile(block.text, f"README.md:{block.line}", "exec")
        exec(code, {"__name__": "__readme__"})
        return
    steps = console_steps(block.text)
    assert steps, f"README.md line {block.line}: a console block without `$ ` commands"
    for cmd, expected in steps:
        proc = _run(cmd, work)
        out = proc.stdout
        where = f"README.md line {block.line}: `{shlex.quote(cmd)}`"
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{out[-3000:]}"
        missing = check_output(expected, out)
        assert not missing, f"{where}: README lines not in its output:\n{missing}\n--- output:\n{out}"
