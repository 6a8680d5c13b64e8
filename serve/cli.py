"""`anomaly-assistant serve` (UI + HTTP API on a model) and `anomaly-assistant demo` (on bundled samples).

`serve` loads `--model` (a checkpoint folder, a hub id, or `tiny` for a random toy; without it the embedded
default model), or screens with the expert only (`--expert-only`). `demo` starts the UI on the default
model with the bundled sample images and a ready reference set ("demo samples"), warms it up, and prints
the URL. Folder batches read the server's disk, so they are off unless `--batch-root DIR` names the one folder
tree they may read (`demo` sets it to the bundled samples folder); zip uploads work either way.
Both bind 127.0.0.1 unless `--host` says otherwise. Usage errors exit 2 with one line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_assistant.commands.config import DEVICE_HELP, parse_config, resolve_device
from anomaly_assistant.commands.runtime import InputError, load_model, run_command

DEMO_SET = "demo samples"


@dataclass
class ServeConfig:
    """Start the inspector's workbench: the browser UI at / and the HTTP API at /api (docs at /api/docs)."""

    model: str | None = field(default=None, metadata={
        "help": "checkpoint folder or hub id; `tiny` is a random toy; none: the embedded default model"})
    expert_only: bool = field(default=False, metadata={"help": "no language model: reference matching only"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the "
                                                              "network: use --auth)"})
    port: int = field(default=7860, metadata={"help": "TCP port"})
    auth: str | None = field(default=None, metadata={"help": "USER:PASS required by the UI and the API",
                                                     "metavar": "USER:PASS"})
    db: str = field(default="runs/serve/records.db", metadata={"help": "SQLite records file (reference sets, "
                                                                       "uploads, reports live beside it)"})
    max_upload_mb: float = field(default=20.0, metadata={"help": "largest accepted upload per file, in MB"})
    max_pixels: int | None = field(default=None, metadata={
        "help": "largest accepted image in pixels (default: the library's limit, 64 M)"})
    concurrency: int = field(default=1, metadata={"help": "model calls allowed at once (others queue)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    batch_root: str | None = field(default=None, metadata={
        "help": "folder batches may read only folders under DIR (after symlinks); without it they are off "
                "(zip uploads still work). demo: the bundled samples folder", "metavar": "DIR"})

    def __post_init__(self) -> None:
        if self.auth is not None and (":" not in self.auth or not self.auth.split(":", 1)[0]):
            raise ValueError("--auth must be USER:PASS")
        if self.max_upload_mb <= 0 or self.concurrency < 1 or not 0 < self.port < 65536:
            raise ValueError("--max-upload-mb must be > 0, --concurrency >= 1, --port in 1..65535")
        if self.batch_root is not None and not Path(self.batch_root).expanduser().is_dir():
            raise ValueError(f"--batch-root {self.batch_root}: no such folder")


def build(config: ServeConfig, command: str = "serve"):  # noqa: ANN201 - a FastAPI app
    """The app for a config (loads the model, opens the records); `demo` adds the sample reference set."""
    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.serve.app import create_app
    from anomaly_assistant.serve.records import RecordStore
    from anomaly_assistant.serve.service import DEFAULT_MODEL_ID, Workbench

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if config.expert_only:
        assistant, model_id = AnomalyAssistant.expert_only(), "expert-only (EfficientNet-Lite0 matching)"
    else:
        assistant = load_model(config.model, resolve_device(config.device),
                               "serve the expert alone: --expert-only")
        model_id = config.model or DEFAULT_MODEL_ID
    store = RecordStore(config.db)
    wb = Workbench(assistant, store, model_id, max_upload_mb=config.max_upload_mb,
                   max_pixels=config.max_pixels, concurrency=config.concurrency, batch_root=config.batch_root)
    default_set, samples = None, ()
    if command == "demo":
        from anomaly_assistant.resources import sample_images, sample_references

        refs = sample_references()
        paths = store.save_reference_set(DEMO_SET, [(p.name, p.read_bytes()) for p in refs])
        assistant.reference_screener([str(p) for p in paths])  # fit now, so the first click is quick
        default_set, samples = DEMO_SET, sample_images()
    auth = tuple(config.auth.split(":", 1)) if config.auth else None
    return create_app(wb, auth=auth, default_reference_set=default_set, concurrency=config.concurrency,
                      samples=samples)


def main(argv: list[str] | None = None, command: str = "serve") -> int:
    """`anomaly-assistant serve|demo [options]`; runs until interrupted. Exit codes as every command's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"anomaly-assistant {command}"
    return run_command(prog, argv, lambda: _run(argv, command, prog))


def _run(argv: list[str], command: str, prog: str) -> int:
    config = parse_config(ServeConfig, argv, prog, (ServeConfig.__doc__ or "").strip())
    if command == "demo":
        if config.db == "runs/serve/records.db":
            config.db = "runs/demo/records.db"
        if config.batch_root is None:
            from anomaly_assistant.resources import samples_dir

            config.batch_root = str(samples_dir())
    app = build(config, command)
    import uvicorn

    url = f"http://{config.host}:{config.port}/"
    print(f"Inspector's workbench: {url}  (API docs: {url}api/docs; records: {Path(config.db).resolve()})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    server.run()
    if not server.started:
        raise InputError(f"could not serve on {config.host}:{config.port} (port in use?)")
    return 0


if __name__ == "__main__":
    name = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("serve", "demo") else "serve"
    sys.exit(main(command=name))
