"""A real server in a subprocess (`demo` on the tiny model: the workbench's mechanics, fast), and Debian's
Chromium for Playwright. The default model's own demo is tested in tests/model/test_default_model.py."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`anomaly-assistant demo` on a free port with its own records file; `kill()` is a real SIGKILL."""

    def __init__(self, root: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "records.db"
        self.log = open(root / "server.log", "w")  # noqa: SIM115 - closed in stop()
        # One torch thread: on this shared 2-core machine two intra-op threads per tiny matrix-vector product
        # spin against the other processes (the demo's reference fit took ~56 s with two, ~2 s with one).
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        args = args if "--model" in args else ("--model", "tiny", *args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anomaly_assistant.serve.cli", "demo", "--port", str(self.port),
             "--db", str(self.db), *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                if self.http.get("/api/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up within 300 s")

    def alive(self) -> bool:
        return self.proc.poll() is None and self.http.get("/api/health").status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.http.close()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"), "--max-upload-mb", "5")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing (never `playwright install`, which downloads)."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("Chromium missing and apt-get unavailable (run as root: apt-get install -y chromium)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return CHROMIUM
