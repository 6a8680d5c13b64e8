"""The inspector's workbench in the browser (gradio Blocks), mounted beside the HTTP API in one FastAPI app.

Tabs: **Inspect** (upload -> verdict badge, heatmap overlay with numbered boxes, defect type, rationale; a
chat about the image streamed with its whole history; the inspector's own verdict and note; reports as HTML,
JSON and Markdown (zip with the overlay)),
**Batch** (a folder under the server's `--batch-root`, or a zip, with a progress bar, and a results table
with an overlay thumbnail per row that sorts by score or name and filters by verdict),
**History** (search and filter the records, CSV export) and **API** (how machines call it). Each browser tab
keeps its own conversations in `gr.State`; the model is shared through the `Workbench`'s slots.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from anomaly_assistant.serve.records import OPERATOR_VERDICTS
from anomaly_assistant.serve.service import Busy, Inspection, UploadError, Workbench, zip_images

log = logging.getLogger(__name__)
CHAT_HINT = "After an inspection, ask about the part here; each answer sees the whole conversation."
NO_CHAT = "Chat needs a language model; this server screens with the expert only."

CSS = """
#banner { background: #fff3cd; border: 1px solid #e0a800; border-radius: 6px; padding: 4px 12px; }
#banner p { color: #5c4400 !important; margin: 4px 0; }
.badge { display: inline-block; padding: 6px 14px; border-radius: 6px; font-weight: 700; font-size: 1.2em;
         color: white; }
.badge.anomalous { background: #c0392b; }
.badge.refused { background: #7f8c8d; } .badge.normal { background: #1e8449; }
.badge-sub { margin-left: 10px; color: var(--body-text-color); }
"""

HISTORY_COLUMNS = ["record", "inspected", "image", "verdict", "score", "defect type", "boxes",
                   "reference set", "operator verdict", "operator note"]
BATCH_COLUMNS = ["overlay", "record", "image", "verdict", "score", "defect type", "boxes", "error"]
BATCH_TYPES = ["markdown", "number", "str", "str", "number", "str", "number", "str"]
BATCH_SHOW = ["all", "anomalous", "normal", "errors"]
BATCH_SORT = ["batch order", "score, highest first", "score, lowest first", "image name"]
THUMB_PX = 72


def _badge(inspection: Inspection | None) -> str:
    if inspection is None:
        return ("<div class='badge-sub'>No inspection yet: choose an image, a reference set, "
                "then Inspect.</div>")
    f = inspection.finding
    score = "no score" if f.score is None else f"score {f.score:.3f}"
    who = {"model": "answered by the model", "expert": "decided by the anomaly expert",
           "none": "no decision: flagged for review"}.get(f.source, f.source)
    return (f"<span class='badge {f.verdict}' id='verdict-badge'>{f.verdict.upper()}</span>"
            f"<span class='badge-sub'>{score} · {who} · record #{inspection.record_id}</span>")


def _details(inspection: Inspection | None, errors: list[str] = ()) -> str:
    lines = [f"**Not inspected:** {html.escape(e)}" for e in errors]
    if inspection is not None:
        f = inspection.finding
        lines.append(f"**Image:** {html.escape(inspection.upload.name)} · **reference set:** "
                     f"{html.escape(inspection.reference_set or 'none')}")
        lines.append(f"**Defect type:** {html.escape(f.defect_type or 'none given')}")
        if f.boxes:
            boxes = "; ".join(f"#{i + 1} ({b.x1:.0f}, {b.y1:.0f})-({b.x2:.0f}, {b.y2:.0f})"
                              for i, b in enumerate(f.boxes))
            lines.append(f"**Boxes** (original pixels): {boxes}")
        else:
            lines.append("**Boxes:** none")
        lines.append(f"**Rationale:** {html.escape(f.rationale or 'none given')}")
        if f.parse_error:
            lines.append("*The model's written answer did not follow the answer format, so the verdict comes "
                         "from the anomaly expert.*")
        lines += [f"*Note: {html.escape(n)}*" for n in f.notes]
    return "\n\n".join(lines)


def _current(state: dict | None) -> Inspection | None:
    if not state or not state.get("items"):
        return None
    return state["items"][state["current"]]


def _fail(exc: Exception) -> gr.Error:
    """What the inspector sees when something goes wrong (the server keeps running)."""
    if isinstance(exc, (UploadError, Busy)):
        return gr.Error(str(exc))
    log.exception("UI action failed")
    return gr.Error(f"Something went wrong: {type(exc).__name__}: {exc}")


def build_ui(wb: Workbench, default_reference_set: str | None = None,
             samples: Sequence[Path] = ()) -> gr.Blocks:
    """The Blocks app; `default_reference_set` is preselected and `samples` offered (the demo's)."""
    has_llm = wb.assistant.has_llm

    def set_choices() -> list[tuple[str, str]]:
        return [("none", "")] + [(n, n) for n in wb.store.reference_sets()]

    with gr.Blocks(title="Anomaly assistant - inspector's workbench") as demo:
        gr.Markdown("## Anomaly assistant: inspector's workbench\nUpload a part image, pick a set of "
                    "known-good images of the same part, press **Inspect**. Then ask follow-up questions, "
                    f"record your own verdict, and export a report. Model: `{wb.model_id}`.")
        if wb.banner:
            gr.Markdown(f"**Warning:** {wb.banner}", elem_id="banner")
        state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                with gr.Row():
                    with gr.Column(scale=1):
                        files = gr.File(label="1. Image(s) to inspect", file_count="multiple",
                                        file_types=["image"], elem_id="images")
                        pasted = gr.Image(label="or paste (Ctrl+V) / drop one image", type="filepath",
                                          sources=["clipboard", "upload"], height=150, elem_id="pasted")
                        if samples:
                            gr.Examples([[str(p)] for p in samples], inputs=[pasted],
                                        label="or pick a sample")
                        refset = gr.Dropdown(set_choices(), value=default_reference_set or "",
                                             label="2. Reference set (known-good images of this part)",
                                             elem_id="refset")
                        with gr.Accordion("Create a reference set", open=False):
                            set_name = gr.Textbox(label="Name (e.g. line 3 brackets)")
                            set_files = gr.File(label="Good images", file_count="multiple",
                                                file_types=["image"])
                            set_save = gr.Button("Save reference set")
                            set_msg = gr.Markdown()
                        inspect_btn = gr.Button("3. Inspect", variant="primary", elem_id="inspect-btn")
                        pick = gr.Dropdown([], label="Result shown (several images uploaded)", visible=False,
                                           elem_id="pick")
                    with gr.Column(scale=2):
                        badge = gr.HTML(_badge(None), elem_id="verdict")
                        overlay = gr.Image(label="Heatmap overlay (red = anomalous) with numbered boxes",
                                           type="pil", interactive=False, format="png", elem_id="overlay",
                                           height=460)
                        details = gr.Markdown(elem_id="details")
                with gr.Row():
                    with gr.Column(scale=2):
                        chatbot = gr.Chatbot(label="Conversation about this image", elem_id="chat",
                                             height=300, placeholder=CHAT_HINT if has_llm else NO_CHAT)
                        with gr.Row():
                            question = gr.Textbox(placeholder="Ask a follow-up, e.g. what caused it?",
                                                  show_label=False, scale=4, elem_id="question",
                                                  interactive=has_llm)
                            ask = gr.Button("Ask", scale=1, elem_id="ask-btn", interactive=has_llm,
                                        variant="primary")
                    with gr.Column(scale=1):
                        op_verdict = gr.Radio(list(OPERATOR_VERDICTS), elem_id="op-verdict",
                                              label="Your verdict on the model's call")
                        op_note = gr.Textbox(label="Note", lines=2, elem_id="op-note")
                        op_save = gr.Button("Save verdict and note", elem_id="op-save")
                        op_msg = gr.Markdown(elem_id="op-msg")
                        export_btn = gr.Button("Export report (HTML, JSON, Markdown zip)",
                                               elem_id="export-btn")
                        export_files = gr.File(label="Report files", file_count="multiple", interactive=False,
                                               elem_id="export-files", visible=False)
            with gr.Tab("Batch", id="batch"):
                gr.Markdown("Inspect a whole folder on the server or a zip of images with the chosen "
                            "reference set. Each image becomes a record; bad files are listed, not fatal.")
                if wb.batch_root is not None:
                    folder_label = f"Folder on the server, under {wb.batch_root}"
                    folder_hint = "a folder name under the batch root, or its full path"
                else:
                    folder_label = "Folder on the server: off (start the server with --batch-root DIR)"
                    folder_hint = "folder batches are off on this server; upload a zip instead"
                with gr.Row():
                    folder = gr.Textbox(label=folder_label, placeholder=folder_hint, scale=2,
                                        elem_id="batch-folder", interactive=wb.batch_root is not None)
                    zip_file = gr.File(label="or a zip of images", file_types=[".zip"], scale=1)
                    batch_set = gr.Dropdown(set_choices(), value=default_reference_set or "",
                                            label="Reference set", scale=1)
                batch_btn = gr.Button("Run batch", variant="primary", elem_id="batch-btn")
                with gr.Row():
                    batch_show = gr.Radio(BATCH_SHOW, value="all", label="Show", elem_id="batch-show")
                    batch_sort = gr.Radio(BATCH_SORT, value="batch order", label="Sort by",
                                          elem_id="batch-sort")
                batch_rows = gr.State([])
                batch_table = gr.Dataframe(headers=BATCH_COLUMNS, datatype=BATCH_TYPES, interactive=False,
                                           show_search="filter", elem_id="batch-table", wrap=True,
                                           column_widths=[f"{THUMB_PX + 24}px"] + [None] * 7)
                batch_gallery = gr.Gallery(label="Overlays (click to enlarge)", columns=6, height=300,
                                           object_fit="contain", elem_id="batch-gallery")
                batch_csv = gr.File(label="Batch results (CSV)", interactive=False, visible=False)
            with gr.Tab("History", id="history") as history_tab:
                with gr.Row():
                    query = gr.Textbox(label="Search (image name, defect type, rationale, note)", scale=3,
                                       elem_id="history-query")
                    verdict_filter = gr.Dropdown(["any", "anomalous", "normal"], value="any", label="Verdict")
                    review_filter = gr.Dropdown(["any", "unreviewed", *OPERATOR_VERDICTS], value="any",
                                                label="Operator review")
                with gr.Row():
                    search_btn = gr.Button("Search", elem_id="history-search")
                    csv_btn = gr.Button("Export CSV", elem_id="history-csv")
                history_table = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, show_search="filter",
                                             elem_id="history-table")
                history_csv = gr.File(label="CSV", interactive=False, visible=False)
            with gr.Tab("API", id="api"):
                gr.Markdown(API_HELP)

        # -- callbacks ----------------------------------------------------------------------
        def view(st: dict | None, errors: list[str] = ()) -> tuple:
            cur = _current(st)
            names = [(f"{i + 1}. {it.upload.name}", i) for i, it in enumerate(st["items"])] if st else []
            record = wb.store.get(cur.record_id) if cur else None
            picker = gr.update(choices=names, value=st["current"] if st else None, visible=len(names) > 1)
            badge_html = _badge(cur) if cur or not errors else (
                "<span class='badge refused' id='verdict-badge'>NOT INSPECTED</span>"
                "<span class='badge-sub'>see the reason below</span>")
            return (st, badge_html, cur.overlay if cur else None, _details(cur, errors),
                    [] if cur is None else _chat_view(cur), picker, record and record.operator_verdict,
                    (record and record.operator_note) or "", "", gr.update(value=None, visible=False))

        # export_files last: a new result hides the previous result's report files
        view_outputs = [state, badge, overlay, details, chatbot, pick, op_verdict, op_note, op_msg,
                        export_files]

        def on_inspect(paths: list[str] | None, pasted_path: str | None, set_name_: str,
                       progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - gradio's idiom
            paths = list(paths or []) + ([pasted_path] if pasted_path else [])
            if not paths:
                return view(None, ["choose an image to inspect first (step 1)."])
            items, errors = [], []
            for i, path in enumerate(paths):
                progress((i, len(paths)), desc=f"inspecting {Path(path).name}")
                try:
                    items.append(wb.inspect(wb.check_file(path), set_name_ or None))
                except (UploadError, Busy) as exc:
                    errors.append(str(exc))
                except Exception as exc:
                    raise _fail(exc) from exc
            if not items:
                return view(None, errors)  # said in the result panel, not as a red error over every box
            return view({"items": items, "current": 0}, errors)

        inspect_btn.click(on_inspect, [files, pasted, refset], view_outputs, concurrency_limit=None)

        def on_pick(st: dict | None, index: int | None) -> tuple:
            if st and index is not None:
                st["current"] = int(index)
            return view(st)

        pick.input(on_pick, [state, pick], view_outputs)

        def on_ask(st: dict | None, text: str, history: list) -> Iterator[tuple]:
            cur = _current(st)
            history = list(history or []) + [{"role": "user", "content": text},
                                             {"role": "assistant", "content": ""}]
            if cur is None:
                history[-1]["content"] = "(Inspect an image first: the chat is about the inspected image.)"
                yield history, text
                return
            try:
                for reply in wb.chat_stream(cur, text):
                    history[-1] = {"role": "assistant", "content": reply}
                    yield history, ""
            except (UploadError, Busy) as exc:
                history[-1] = {"role": "assistant", "content": f"(Could not answer: {exc})"}
                yield history, text
                return
            except Exception as exc:
                raise _fail(exc) from exc
            yield _chat_view(cur), ""

        for trigger in (ask.click, question.submit):
            trigger(on_ask, [state, question, chatbot], [chatbot, question], concurrency_limit=None)

        def on_operator(st: dict | None, verdict: str | None, note: str) -> str:
            cur = _current(st)
            if cur is None:
                raise gr.Error("Inspect an image first.")
            wb.store.set_operator(cur.record_id, verdict, note)
            return f"Saved on record #{cur.record_id}: {verdict or 'no verdict'}" + (" with a note." if note
                                                                                     else ".")

        op_save.click(on_operator, [state, op_verdict, op_note], op_msg)

        def on_export(st: dict | None) -> dict:
            cur = _current(st)
            if cur is None:
                raise gr.Error("Inspect an image first.")
            return gr.update(value=[str(p) for p in wb.export_report(cur.record_id)], visible=True)

        export_btn.click(on_export, state, export_files)

        def on_save_set(name: str, paths: list[str] | None) -> tuple:
            try:
                uploads = [wb.check_file(p) for p in paths or []]
                wb.save_reference_set(name, uploads)
            except Exception as exc:
                raise _fail(exc) from exc
            choices = set_choices()
            return (f"Saved reference set **{html.escape(name.strip())}** ({len(uploads)} images).",
                    gr.update(choices=choices, value=name.strip()), gr.update(choices=choices))

        set_save.click(on_save_set, [set_name, set_files], [set_msg, refset, batch_set])

        def on_batch(folder_: str, zip_path: str | None, set_name_: str, show: str, order: str,
                     progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
            try:
                items = _batch_items(wb, folder_, zip_path)
                batch_id, rows = wb.batch(items, set_name_ or None,
                                          progress=lambda i, n, name: progress((i, n), desc=name))
            except Exception as exc:
                raise _fail(exc) from exc
            for r in rows:
                r["thumb"] = _thumbnail(wb, r)
            thumbs = [(str(wb.overlay_path(r["record_id"])),
                       f"#{r['record_id']} {r['name']}: {r['verdict']}") for r in rows if r["record_id"]]
            csv_path = wb.export_csv(wb.store.search(batch_id=batch_id, limit=100_000))
            return rows, _batch_table(rows, show, order), thumbs, gr.update(value=str(csv_path), visible=True)

        batch_btn.click(on_batch, [folder, zip_file, batch_set, batch_show, batch_sort],
                        [batch_rows, batch_table, batch_gallery, batch_csv], concurrency_limit=None)
        for control in (batch_show, batch_sort):
            control.change(_batch_table, [batch_rows, batch_show, batch_sort], batch_table,
                           show_progress="hidden")

        def search(q: str, verdict: str, review: str) -> list[list[Any]]:
            return [_history_row(r) for r in _search(wb, q, verdict, review)]

        search_btn.click(search, [query, verdict_filter, review_filter], history_table)
        query.submit(search, [query, verdict_filter, review_filter], history_table)
        history_tab.select(search, [query, verdict_filter, review_filter], history_table)
        csv_btn.click(lambda q, v, r: gr.update(value=str(wb.export_csv(_search(wb, q, v, r))), visible=True),
                      [query, verdict_filter, review_filter], history_csv)

        def refresh_sets() -> tuple:
            choices = set_choices()
            return gr.update(choices=choices), gr.update(choices=choices)

        demo.load(refresh_sets, None, [refset, batch_set], show_progress="hidden")
    return demo


def _chat_view(inspection: Inspection) -> list[dict]:
    """The chat as shown: follow-ups only (the first turn is the fixed inspection prompt, shown above)."""
    return [{"role": t["role"], "content": t["content"]} for t in inspection.session.history[2:]]


def _search(wb: Workbench, q: str, verdict: str, review: str) -> list:
    return wb.store.search(q or "", None if verdict in ("any", None) else verdict,
                           None if review in ("any", None) else review, limit=500)


def _history_row(r: Any) -> list[Any]:
    import time

    return [r.id, time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)), r.image_name, r.verdict,
            None if r.score is None else round(r.score, 3), r.defect_type or "", len(r.boxes),
            r.reference_set or "", r.operator_verdict or "", r.operator_note or ""]


def _batch_items(wb: Workbench, folder: str, zip_path: str | None) -> list[tuple[str, Any]]:
    if zip_path:
        size = Path(zip_path).stat().st_size
        if size > wb.max_upload_bytes * 50:
            raise UploadError(f"the zip is {size / 2**20:.0f} MB; split it into smaller batches")
        return zip_images(Path(zip_path).read_bytes())
    if not (folder or "").strip():
        raise UploadError("give a folder on the server or upload a zip")
    return wb.folder_items(folder)  # refused outside --batch-root, or when folder batches are off


def _thumbnail(wb: Workbench, row: dict) -> str:
    """A small overlay picture for a batch row, as Markdown with a data URI (no file serving needed)."""
    path = wb.overlay_path(row["record_id"]) if row["record_id"] else None
    if path is None or not path.exists():
        return ""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    alt = re.sub(r"[^A-Za-z0-9._ -]", "_", f"#{row['record_id']} {row['name']}")
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


def _batch_table(rows: list[dict] | None, show: str, order: str) -> list[list[Any]]:
    """The batch rows shown: filtered by verdict ("errors": refused files) and sorted as chosen."""
    rows = list(rows or [])
    if show in ("anomalous", "normal"):
        rows = [r for r in rows if r["verdict"] == show]
    elif show == "errors":
        rows = [r for r in rows if r["error"]]
    if order.startswith("score"):
        scored = [r for r in rows if r["score"] is not None]
        rows = sorted(scored, key=lambda r: r["score"], reverse="highest" in order) + \
            [r for r in rows if r["score"] is None]  # unscored (refused) rows last either way
    elif order == "image name":
        rows = sorted(rows, key=lambda r: r["name"].lower())
    return [[r.get("thumb", ""), r["record_id"], r["name"], r["verdict"], r["score"], r["defect_type"],
             r["boxes"], r["error"] or ""] for r in rows]


API_HELP = """
### HTTP API
The same server answers machines under `/api` (interactive docs at [/api/docs](/api/docs), schema at
`/api/openapi.json`). With `--auth USER:PASS`, send HTTP Basic credentials.

| call | what |
|---|---|
| `GET /api/health` | model, record count, reference sets |
| `POST /api/inspect` (`image`; `references` or `reference_set`) | Finding, `record_id`, `session_id` |
| `POST /api/chat` `{"session_id", "message"}` | the reply and the whole history |
| `POST /api/batch` (`images`, a `zip`, or a `folder` under `--batch-root`; `reference_set`) | rows |
| `GET /api/records?q=&verdict=` · `GET /api/records.csv` · `GET /api/records/{id}` | the records |
| `GET /api/records/{id}/report.html` · `report.md` · `report.zip` (report.md + overlay.png) | reports |
| `POST /api/records/{id}/operator` `{"verdict", "note"}` | the inspector's call |
| `GET/POST /api/reference-sets` | named sets of good images |

```
curl -F image=@part.png -F reference_set=demo http://127.0.0.1:7860/api/inspect
```
"""


def create_app(wb: Workbench, auth: tuple[str, str] | None = None, default_reference_set: str | None = None,
               concurrency: int = 1, samples: Sequence[Path] = ()) -> Any:
    """One FastAPI app: the `/api` routes, and the gradio UI at `/` (same auth, same upload size limit).

    The UI may hand out only reports and overlay pictures from the records folder, never the database.
    """
    from fastapi import FastAPI

    from anomaly_assistant.serve.api import add_api

    app = FastAPI(title="anomaly-assistant", description="Visual inspection API (see /api/docs).",
                  docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    add_api(app, wb, auth)
    ui = build_ui(wb, default_reference_set, samples)
    ui.queue(default_concurrency_limit=concurrency, max_size=256)
    max_mb = max(1, int(wb.max_upload_bytes / 2**20 + 0.999))
    shared = [str(wb.store.root / "reports"), str(wb.store.root / "overlays")]
    return gr.mount_gradio_app(app, ui, path="/", auth=auth, max_file_size=f"{max_mb}mb", css=CSS,
                               footer_links=["api"], allowed_paths=shared)
