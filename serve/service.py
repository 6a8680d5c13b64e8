"""The workbench behind both the browser UI and the HTTP API: checked uploads, inspections, chat, batches.

One `Workbench` wraps one `AnomalyAssistant` and one `RecordStore`. Every call that runs the model holds a
slot of one semaphore (`concurrency`, default 1), shared by the UI and the API, so the model is never run by
more callers than it can take; a caller that waits longer than `queue_timeout_s` gets `Busy` instead of
piling up. Conversations are `ChatSession`s owned by their caller (a browser tab's `gr.State`, or an API
session id): the assistant keeps no per-call state, so no session sees another's history.

Uploads are checked before any model work: size (`max_upload_mb`), content (decoded by `images.load_image`,
which also applies the pixel-count limit from the header, so a decompression bomb is refused before it
allocates), and file name (a name with a folder part or `..` is refused, never joined to a path).

Folder batches read the server's own disk, so they are off unless the server names a batch root
(`--batch-root DIR`): a folder is then resolved (symlinks followed) and must lie inside that root, and so must
each image in it (a link that leads out becomes an error row). Zip uploads need no root.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from anomaly_assistant.assistant import AnomalyAssistant, ChatSession
from anomaly_assistant.finding import Finding
from anomaly_assistant.images import IMAGE_SUFFIXES, ImageError, list_images, load_image
from anomaly_assistant.overlay import render_overlay
from anomaly_assistant.serve.records import Record, RecordStore, records_csv, sha256

_NAME_OK = re.compile(r"[^A-Za-z0-9._ ()+-]")
IMAGE_FORMATS = {"PNG", "JPEG", "BMP", "TIFF", "WEBP", "MPO"}


class UploadError(ValueError):
    """An upload refused before any model work; `status` is the HTTP code (400 bad input, 413 too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Busy(RuntimeError):
    """The model stayed busy longer than the queue timeout (HTTP 503: try again)."""


@dataclass
class Upload:
    """A checked upload: safe name, original bytes, decoded RGB image."""

    name: str
    data: bytes
    image: Image.Image

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix.lower() if Path(self.name).suffix.lower() in IMAGE_SUFFIXES else ".png"


@dataclass
class Inspection:
    """One inspected image and its conversation, owned by one browser tab or one API session."""

    session: ChatSession
    record_id: int
    finding: Finding
    upload: Upload
    overlay: Image.Image
    reference_set: str | None


def safe_name(name: str | None) -> str:
    """The file name to show and store; refuses names with a folder part (path traversal) or control bytes."""
    raw = (name or "").strip()
    if not raw:
        return "image"
    if "/" in raw or "\\" in raw or ".." in raw or any(ord(c) < 32 for c in raw):
        raise UploadError(f"file name {raw[:80]!r} is not a plain file name (no folders, no '..')")
    return _NAME_OK.sub("_", raw)[-100:]


DEFAULT_MODEL_ID = "default (SmolLM2-135M + EfficientNet-Lite0)"  # how the workbench names the default model


def untrained_banner(model_id: str, has_llm: bool) -> str | None:
    """The warning shown on every page when answers cannot be trusted (a tiny random or expert-only model)."""
    if not has_llm:
        return ("Expert-only screening: verdict, score, heatmap and boxes come from matching against the "
                "reference set (no language model, so no defect type, rationale or chat). Pick a reference "
                "set.")
    if model_id == "tiny" or model_id.startswith("tiny:"):
        return ("Untrained demo model (tiny, random weights): the written answers and chat are noise. "
                "Verdict, score, heatmap and boxes come from matching against the reference set, so pick "
                "one.")
    if model_id == DEFAULT_MODEL_ID:
        return ("Embedded default model (135 M parameters, trained on synthetic parts only): pick a "
                "reference set of good parts; its explanations are short and generic. Load a larger trained "
                "model for production.")
    return None


class Workbench:
    """Checked uploads -> inspections, chat turns and batches, each stored as a record."""

    def __init__(self, assistant: AnomalyAssistant, store: RecordStore, model_id: str,
                 max_upload_mb: float = 20.0, max_pixels: int | None = None, concurrency: int = 1,
                 queue_timeout_s: float = 300.0, max_api_sessions: int = 256,
                 batch_root: str | Path | None = None):
        self.assistant = assistant
        self.batch_root = Path(batch_root).expanduser().resolve() if batch_root else None
        self.store = store
        self.model_id = model_id
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        self.queue_timeout_s = queue_timeout_s
        self.banner = untrained_banner(model_id, assistant.has_llm)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._api_sessions: OrderedDict[str, Inspection] = OrderedDict()
        self._api_lock = threading.Lock()
        self._max_api_sessions = max_api_sessions

    # -- uploads --------------------------------------------------------------------------------------------
    def check_upload(self, name: str | None, data: bytes) -> Upload:
        """Size, name and content checks; raises UploadError with a message meant for the inspector."""
        name = safe_name(name)
        if len(data) > self.max_upload_bytes:
            raise UploadError(f"{name}: {len(data) / 2**20:.1f} MB is over the upload limit of "
                              f"{self.max_upload_bytes / 2**20:.0f} MB", status=413)
        if not data:
            raise UploadError(f"{name}: the file is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                kind = probe.format
        except Image.DecompressionBombError as exc:
            raise UploadError(f"{name}: the image is too large to decode safely ({exc})", 413) from None
        except Exception:
            kind = None
        if kind not in IMAGE_FORMATS:
            raise UploadError(f"{name}: not an image (content is not PNG, JPEG, BMP, TIFF or WebP, "
                              "whatever the file name says)")
        try:
            image = load_image(data, max_pixels=self.max_pixels)
        except ImageError as exc:
            message = str(exc).replace("bytes:", "").strip()
            status = 413 if "megapixels" in message or "bomb" in message else 400
            raise UploadError(f"{name}: {message}", status=status) from None
        return Upload(name, data, image)

    def check_file(self, path: str | Path, name: str | None = None) -> Upload:
        """`check_upload` for a file on the server's disk (gradio's upload cache, a batch folder)."""
        path = Path(path)
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise UploadError(f"{name or path.name}: {size / 2**20:.1f} MB is over the upload limit of "
                              f"{self.max_upload_bytes / 2**20:.0f} MB", status=413)
        return self.check_upload(name or path.name, path.read_bytes())

    # -- the model, one slot at a time ----------------------------------------------------------------------
    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one model slot; Busy when none frees up within the queue timeout."""
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            raise Busy(f"the model is busy (waited {self.queue_timeout_s:.0f} s); try again shortly")
        try:
            yield
        finally:
            self._slots.release()

    def references(self, reference_set: str | None, uploads: Sequence[Upload] = ()) -> list[Any]:
        """Reference images for a call: uploaded ones win, else the named set, else none."""
        if uploads:
            return [u.image for u in uploads]
        if reference_set:
            try:
                return [str(p) for p in self.store.reference_paths(reference_set)]
            except KeyError:
                raise UploadError(f"no reference set named {reference_set!r}") from None
        return []

    def save_reference_set(self, name: str, uploads: Sequence[Upload]) -> list[Path]:
        """Persist a named set of good images (already checked) for later inspections."""
        if not uploads:
            raise UploadError("a reference set needs at least one good image")
        try:
            return self.store.save_reference_set(name, [(u.name, u.data) for u in uploads])
        except ValueError as exc:
            raise UploadError(str(exc)) from None

    def inspect(self, upload: Upload, reference_set: str | None = None, references: Sequence[Upload] = (),
                batch_id: str | None = None) -> Inspection:
        """Inspect one checked upload in a new conversation and store the record."""
        refs = self.references(reference_set, references)
        if not refs and not self.assistant.has_llm:
            raise UploadError("expert-only screening needs reference images: pick or create a reference set")
        set_label = reference_set if not references else "(uploaded with the request)"
        with self.slot():
            session = self.assistant.chat(references=refs or None)
            finding = session.inspect(upload.image)
            overlay = render_overlay(upload.image, finding, threshold=self.assistant.threshold)
        finding.image_path = upload.name
        # Files first, then the row that names them: a crash in between leaves an unused file, never a
        # record pointing at nothing.
        stored = self.store.store_file("uploads", upload.data, upload.suffix)
        png = io.BytesIO()
        overlay.save(png, format="PNG")
        overlay_path = self.store.store_file("overlays", png.getvalue(), ".png")
        record_id = self.store.add(finding, image_name=upload.name, input_hash=sha256(upload.data),
                                   model_id=self.model_id, image_path=str(stored),
                                   overlay_path=str(overlay_path), reference_set=set_label,
                                   chat=session.history, batch_id=batch_id)
        return Inspection(session, record_id, finding, upload, overlay, set_label)

    def chat_stream(self, inspection: Inspection, text: str) -> Iterator[str]:
        """A follow-up turn about the inspected image, yielding the reply so far; the record gets the chat."""
        if not self.assistant.has_llm:
            raise UploadError("this server runs the expert only (no language model), so it cannot chat")
        if not (text or "").strip():
            raise UploadError("type a question first")
        reply = ""
        with self.slot():
            for piece in inspection.session.stream(text.strip()):
                reply += piece
                yield reply
        self.store.set_chat(inspection.record_id, inspection.session.history)

    def folder_items(self, folder: str | Path) -> list[tuple[str, bytes | UploadError]]:
        """The images of a server folder under the batch root, as batch items (name, bytes or the refusal).

        A relative folder is taken relative to the batch root. Raises UploadError (403) when folder batches
        are off (no batch root) or the folder resolves, after symlinks, outside the root; 400 when it is not
        a folder or holds no images. An image that links outside the root is an error item.
        """
        if self.batch_root is None:
            raise UploadError("folder batches are off on this server: start it with --batch-root DIR to "
                              "allow folders under DIR, or upload a zip of images instead", status=403)
        text = str(folder or "").strip()
        if not text:
            raise UploadError(f"give a folder under the batch root {self.batch_root} or upload a zip")
        path = (self.batch_root / Path(text).expanduser()).resolve()
        if not path.is_relative_to(self.batch_root):
            raise UploadError(f"{text}: outside the batch root {self.batch_root} (folder batches may read "
                              "only folders under it)", status=403)
        if not path.is_dir():
            raise UploadError(f"{text}: no such folder under the batch root {self.batch_root}")
        items: list[tuple[str, bytes | UploadError]] = []
        for p in list_images(path):
            if not p.resolve().is_relative_to(self.batch_root):
                items.append((p.name, UploadError(f"{p.name}: links outside the batch root; not read", 403)))
            elif (size := p.stat().st_size) > self.max_upload_bytes:  # refused without reading it
                limit = self.max_upload_bytes / 2**20
                items.append((p.name, UploadError(f"{p.name}: {size / 2**20:.1f} MB is over the upload limit "
                                                  f"of {limit:.0f} MB", 413)))
            else:
                items.append((p.name, p.read_bytes()))
        if not items:
            raise UploadError(f"{text}: no images (.png, .jpg, .bmp, .tif, .webp) in this folder")
        return items

    def batch(self, items: Sequence[tuple[str, bytes | UploadError]], reference_set: str | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> tuple[str, list[dict]]:
        """Inspect many images; a bad item becomes an error row, never a failed batch. Returns (id, rows).

        An item's data may be an UploadError already (a file refused while listing it): it becomes that row.
        """
        batch_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        rows = []
        for i, (name, data) in enumerate(items):
            if progress:
                progress(i, len(items), name)
            row: dict[str, Any] = {"name": name, "record_id": None, "verdict": None, "score": None,
                                   "defect_type": None, "boxes": 0, "error": None}
            try:
                if isinstance(data, UploadError):
                    raise data
                done = self.inspect(self.check_upload(name, data), reference_set, batch_id=batch_id)
                f = done.finding
                row.update(name=done.upload.name, record_id=done.record_id, verdict=f.verdict,
                           score=None if f.score is None else round(f.score, 4), defect_type=f.defect_type,
                           boxes=len(f.boxes))
            except UploadError as exc:
                row["error"] = str(exc)
            rows.append(row)
        if progress:
            progress(len(items), len(items), "done")
        return batch_id, rows

    # -- API sessions ---------------------------------------------------------------------------------------
    def open_api_session(self, inspection: Inspection) -> str:
        """Keep an API caller's conversation under a random id (the oldest are dropped past the cap)."""
        session_id = uuid.uuid4().hex
        with self._api_lock:
            self._api_sessions[session_id] = inspection
            while len(self._api_sessions) > self._max_api_sessions:
                self._api_sessions.popitem(last=False)
        return session_id

    def api_session(self, session_id: str) -> Inspection:
        with self._api_lock:
            if session_id not in self._api_sessions:
                raise KeyError("unknown or expired session_id: inspect the image again to start a new one")
            self._api_sessions.move_to_end(session_id)
            return self._api_sessions[session_id]

    # -- reports --------------------------------------------------------------------------------------------
    def overlay_path(self, record_id: int) -> Path | None:
        """The overlay picture stored with a record (None for a record without one)."""
        path = self.store.get(record_id).overlay_path
        return Path(path) if path else None

    def report_json(self, record_id: int) -> dict:
        """The record as a JSON report (Finding without the map, chat, operator verdict and note)."""
        return self.store.get(record_id).to_json()

    def report_html(self, record_id: int) -> str:
        """A self-contained HTML report: overlay embedded, the finding, the chat, the operator's call."""
        return report_html(self.store.get(record_id), self.overlay_path(record_id))

    def report_markdown(self, record_id: int) -> str:
        """The report as Markdown; the overlay is linked as `overlay.png` beside it (see `report_zip`)."""
        record = self.store.get(record_id)
        overlay = self.overlay_path(record_id)
        return report_markdown(record, "overlay.png" if overlay is not None and overlay.exists() else None)

    def report_zip(self, record_id: int) -> bytes:
        """The Markdown report zipped: `inspection-N/report.md` with `inspection-N/overlay.png` beside it."""
        stem = f"inspection-{record_id}"
        overlay = self.overlay_path(record_id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{stem}/report.md", self.report_markdown(record_id))
            if overlay is not None and overlay.exists():
                archive.write(overlay, f"{stem}/overlay.png")
        return buf.getvalue()

    def export_report(self, record_id: int) -> tuple[Path, Path, Path]:
        """Write the HTML, JSON and Markdown (zip: report.md + overlay.png) reports; returns their paths."""
        folder = self.store.root / "reports"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"inspection-{record_id}"
        html_path, json_path = folder / f"{stem}.html", folder / f"{stem}.json"
        md_zip = folder / f"{stem}-markdown.zip"
        html_path.write_text(self.report_html(record_id), encoding="utf-8")
        json_path.write_text(json.dumps(self.report_json(record_id), indent=2), encoding="utf-8")
        md_zip.write_bytes(self.report_zip(record_id))
        return html_path, json_path, md_zip

    def export_csv(self, records: Sequence[Record]) -> Path:
        """Write records as CSV under the records folder; returns the path."""
        folder = self.store.root / "reports"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"records-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        path.write_text(records_csv(records), encoding="utf-8")
        return path


def zip_images(data: bytes, max_members: int = 1000) -> list[tuple[str, bytes]]:
    """Image members of a zip as (base name, bytes), read in memory (nothing is extracted to disk)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UploadError("the batch upload is not a zip file") from None
    out = []
    for info in archive.infolist():
        base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if info.is_dir() or Path(base).suffix.lower() not in IMAGE_SUFFIXES or base.startswith("."):
            continue
        if len(out) >= max_members:
            raise UploadError(f"the zip holds more than {max_members} images; split the batch")
        out.append((base, archive.read(info)))
    if not out:
        raise UploadError("the zip holds no image files (.png, .jpg, .bmp, .tif, .webp)")
    return out


def _report_rows(record: Record) -> list[tuple[str, str]]:
    score = "n/a" if record.score is None else f"{record.score:.3f}"
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created_at))
    return [("Image", record.image_name), ("Inspected", created), ("Model", record.model_id),
            ("Reference set", record.reference_set or "none"), ("Verdict", record.verdict), ("Score", score),
            ("Defect type", record.defect_type or "-"), ("Operator verdict", record.operator_verdict or "-"),
            ("Operator note", record.operator_note or "-"), ("Input SHA-256", record.input_hash)]


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell or paragraph (no markup, no line breaks, no raw HTML)."""
    out = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", out)


def report_markdown(record: Record, overlay_name: str | None = "overlay.png") -> str:
    """One inspection as Markdown, linking the overlay picture by a relative name (kept beside the file)."""
    lines = [f"# Inspection {record.id}: {record.verdict}", ""]
    if overlay_name:
        lines += [f"![heatmap overlay with numbered boxes]({overlay_name})", ""]
    lines += ["| | |", "|---|---|"] + [f"| **{k}** | {_md(v)} |" for k, v in _report_rows(record)]
    lines += ["", "## Boxes (original pixels x1, y1, x2, y2)", ""]
    lines += [f"{i + 1}. {', '.join(f'{v:.0f}' for v in b)}" for i, b in enumerate(record.boxes)] or ["none"]
    lines += ["", "## Rationale", "", _md(record.rationale or "-"), "", "## Conversation", ""]
    lines += [f"**{_md(t['role'])}:** {_md(t['content'])}\n" for t in record.chat] or ["-"]
    return "\n".join(lines) + "\n"


def report_html(record: Record, overlay_path: Path | None = None) -> str:
    """One inspection as a self-contained HTML page a person can file or mail."""
    e = html.escape
    picture = ""
    if overlay_path is not None and overlay_path.exists():
        data = base64.b64encode(overlay_path.read_bytes()).decode()
        picture = f'<img alt="overlay" style="max-width:100%" src="data:image/png;base64,{data}">'
    boxes = "".join(f"<li>#{i + 1}: {', '.join(f'{v:.0f}' for v in b)}</li>"
                    for i, b in enumerate(record.boxes))
    chat = "".join(f"<p><b>{e(t['role'])}:</b> {e(t['content'])}</p>" for t in record.chat)
    table = "".join(f"<tr><th align=left>{e(k)}</th><td>{e(str(v))}</td></tr>"
                    for k, v in _report_rows(record))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Inspection {record.id}</title></head>"
            f"<body style='font-family:sans-serif;max-width:60em'><h1>Inspection {record.id}: "
            f"{e(record.verdict)}</h1>{picture}<table>{table}</table><h2>Boxes (original pixels x1, y1, x2, "
            f"y2)</h2><ul>{boxes or '<li>none</li>'}</ul>"
            f"<h2>Rationale</h2><p>{e(record.rationale or '-')}</p>"
            f"<h2>Conversation</h2>{chat or '<p>-</p>'}</body></html>")
