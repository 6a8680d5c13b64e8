"""Research scripts live outside the package (research/, not installed), run from a checkout, and reach the
package through public names only: a refactoring of the product never has to keep a study's internals."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "research").glob("*.py"))


def private_uses(source: str) -> list[str]:
    """Names of `anomaly_assistant` reached through an underscore.

    That is a private module, a private imported name, a private attribute of an imported module
    (`from anomaly_assistant.eval import ad; ad._x`), or a private attribute of any object but `self` / `cls`
    (`assistant._encode(...)`: scripts define no classes of their own, so such an object is the package's).
    """
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "anomaly_assistant":
            found += [node.module for part in node.module.split(".") if part.startswith("_")]
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "anomaly_assistant":
                    found += [a.name for part in a.name.split(".") if part.startswith("_")]
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else ast.unparse(node.value)
        if owner not in ("self", "cls"):
            found.append(f"{owner}.{node.attr}")
    return found


def test_the_checker_sees_private_names():
    src = (
        "from anomaly_assistant.expert._x import A\n"
        "from anomaly_assistant.eval import ad, _helper\n"
        "import anomaly_assistant.tiny as t\n"
        "ad._private(t._y, ad.public)\n"
        "assistant = t.AnomalyAssistant()\n"
        "assistant._encode([]); assistant.model._run(); assistant.chat().ask('x'); len.__name__\n"
    )
    assert sorted(private_uses(src)) == sorted(
        ["anomaly_assistant.expert._x", "anomaly_assistant.eval._helper", "ad._private", "t._y",
         "assistant._encode", "assistant.model._run"]
    )


def test_research_is_a_folder_of_scripts_outside_the_package():
    assert SCRIPTS, "research/ holds the studies"
    assert not (REPO / "research" / "__init__.py").exists()
    assert not list((REPO / "eval").glob("*study*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_research_scripts_use_public_names_only(script):
    assert private_uses(script.read_text()) == []


def test_screening_study_runs_from_a_checkout():
    result = subprocess.run(
        [sys.executable, str(REPO / "research" / "screening_study.py"), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--presets" in result.stdout


def test_docs_name_research_scripts_that_exist():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"research/[\w/]+\.py", doc.read_text())}
    assert "research/screening_study.py" in named
    assert [n for n in named if not (REPO / n).exists()] == []
    stale = [doc.name for doc in docs if "anomaly_assistant.eval.screening_study" in doc.read_text()]
    assert stale == []
