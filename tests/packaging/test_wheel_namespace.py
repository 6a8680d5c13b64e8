"""The built wheel must never put generic top-level `train`/`serve`/`eval` modules on a user's path, and it
carries the product only: research scripts (research/) stay in the checkout."""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel a fresh clone builds: from a copy without the ignored paths, since a stale build/lib would
    carry files that are no longer in the tree (setuptools packs whatever build/lib holds)."""
    ignored = [line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()]
    src = tmp_path_factory.mktemp("checkout") / "repo"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", *filter(None, ignored)))
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(out)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("anomaly_assistant-*.whl")
    return whl


def test_wheel_has_a_single_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"anomaly_assistant"}, top
    for sub in ("train", "serve", "eval", "data_builders"):
        assert f"anomaly_assistant/{sub}/__init__.py" in names
    samples = {
        "anomaly_assistant/resources/samples/good/good_1.png",
        "anomaly_assistant/resources/samples/test/scratch.png",
        "anomaly_assistant/resources/default_model/trained_parts.safetensors",  # the default model's parts
        "anomaly_assistant/resources/default_model/README.md",  # and its card
        "anomaly_assistant/resources/default_model/config.json",
    }
    assert samples <= set(names)  # `make run` inspects them after a plain install


def test_wheel_carries_no_research_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "anomaly_assistant/eval/ad.py" in names  # the product's evaluation ships
    research = [n for n in names if "research" in n.split("/") or "screening_study" in n]
    assert research == [], research


def test_installed_wheel_does_not_shadow_a_users_train_py(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    work = tmp_path / "project"
    work.mkdir()
    for name in ("train", "serve", "eval"):
        (work / f"{name}.py").write_text(f"OWNER = 'user-{name}'\n")
    code = (
        "import train, serve, eval as user_eval, importlib.util as u\n"
        "assert (train.OWNER, serve.OWNER, user_eval.OWNER) == ('user-train', 'user-serve', 'user-eval')\n"
        "for sub in ('train', 'serve', 'eval', 'data_builders'):\n"
        "    spec = u.find_spec('anomaly_assistant.' + sub)\n"
        "    assert spec is not None and 'site-packages' in spec.origin, (sub, spec)\n"
        "assert u.find_spec('data_builders') is None\n"
        "assert u.find_spec('research') is None\n"
        "assert u.find_spec('anomaly_assistant.eval.screening_study') is None\n"
        "print('ok')\n"
    )
    result = subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
