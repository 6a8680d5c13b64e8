"""HTTP API for machines beside the line (FastAPI; the OpenAPI schema is served at `/api/openapi.json`).

Endpoints (all JSON; images as multipart files):

- `GET  /api/health`: model id, whether it has a language model, the untrained banner, record count.
- `POST /api/inspect`: `image` (+ optional `references` files or a `reference_set` name) -> Finding JSON,
  `record_id` and a `session_id` for follow-up chat.
- `POST /api/chat`: `{"session_id", "message"}` -> the reply and the session's whole history.
- `POST /api/batch`: several `images`, one `zip`, or a server `folder` under the batch root
  (+ `reference_set`) -> one row per image, errors as rows. Without `--batch-root` a folder is refused (403).
- `GET  /api/records` (search `q`, `verdict`, `operator_verdict`, `reference_set`, `batch_id`, `limit`),
  `GET /api/records.csv`, `GET /api/records/{id}`, `POST /api/records/{id}/operator`,
  `GET /api/records/{id}/report.html`, `.../report.md` (overlay linked as `overlay.png`), `.../report.zip`
  (report.md + overlay.png).
- `GET/POST /api/reference-sets`: list, or create/replace a named set from `images`.

Errors are `{"error": message}` with 400 (bad input), 403 (a folder outside the batch root, or folder
batches off), 404 (unknown id), 413 (too large), 503 (model busy)
or 500 (an inspection failed; the server stays up).
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from anomaly_assistant.serve.records import OPERATOR_VERDICTS
from anomaly_assistant.serve.service import Busy, UploadError, Workbench, zip_images

log = logging.getLogger(__name__)
_BASIC = HTTPBasic(auto_error=False)


class ChatRequest(BaseModel):
    """A follow-up question in the conversation started by `/api/inspect`."""

    session_id: str
    message: str


class OperatorRequest(BaseModel):
    """An inspector's call on a record: confirmed / overruled: normal / overruled: anomalous, and a note."""

    verdict: str | None = None
    note: str | None = None


async def _read(workbench: Workbench, upload: UploadFile) -> tuple[str | None, bytes]:
    """The upload's bytes, refusing an oversized one from its size before reading it whole."""
    if upload.size is not None and upload.size > workbench.max_upload_bytes:
        raise UploadError(f"{upload.filename}: {upload.size / 2**20:.1f} MB is over the upload limit of "
                          f"{workbench.max_upload_bytes / 2**20:.0f} MB", status=413)
    return upload.filename, await upload.read()


def add_api(app: FastAPI, workbench: Workbench, auth: tuple[str, str] | None = None) -> None:
    """Mount the `/api` routes (HTTP Basic auth when `auth` is given) and their error handlers on `app`."""
    def check_auth(credentials: Annotated[HTTPBasicCredentials | None, Depends(_BASIC)]) -> None:
        if auth is None:
            return
        ok = credentials is not None and secrets.compare_digest(credentials.username, auth[0]) and \
            secrets.compare_digest(credentials.password, auth[1])
        if not ok:
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Basic"})

    router = APIRouter(prefix="/api", dependencies=[Depends(check_auth)])
    wb = workbench

    @router.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": wb.model_id, "has_llm": wb.assistant.has_llm, "banner": wb.banner,
                "records": wb.store.count(), "reference_sets": wb.store.reference_sets(),
                "max_upload_mb": wb.max_upload_bytes / 2**20}

    @router.post("/inspect")
    async def inspect(image: Annotated[UploadFile, File(description="the image to inspect")],
                      references: Annotated[list[UploadFile] | None, File(description="good images")] = None,
                      reference_set: Annotated[str | None, Form()] = None,
                      include_map: Annotated[bool, Form()] = False) -> dict[str, Any]:
        upload = wb.check_upload(*(await _read(wb, image)))
        refs = [wb.check_upload(*(await _read(wb, r))) for r in references or []]
        done = await _run(wb.inspect, upload, reference_set or None, refs)
        return {"record_id": done.record_id, "session_id": wb.open_api_session(done),
                "finding": done.finding.to_json(include_map=include_map)}

    @router.post("/chat")
    async def chat(request: ChatRequest) -> dict[str, Any]:
        inspection = wb.api_session(request.session_id)  # KeyError -> 404

        def turn() -> str:
            replies = list(wb.chat_stream(inspection, request.message))
            return replies[-1] if replies else ""

        reply = await _run(turn)
        return {"reply": reply, "history": inspection.session.history, "record_id": inspection.record_id}

    @router.post("/batch")
    async def batch(images: Annotated[list[UploadFile] | None, File()] = None,
                    zip: Annotated[UploadFile | None, File(description="a zip of images")] = None,  # noqa: A002
                    folder: Annotated[str | None, Form(description="a folder under the server's "
                                                               "--batch-root")] = None,
                    reference_set: Annotated[str | None, Form()] = None) -> dict[str, Any]:
        items: list[tuple[str | None, Any]] = [await _read(wb, f) for f in images or []]
        if zip is not None:
            items += zip_images((await _read(wb, zip))[1])
        if folder:
            items += await _run(wb.folder_items, folder)
        if not items:
            raise UploadError("send images (several `images` files), one `zip`, or a `folder`")
        batch_id, rows = await _run(wb.batch, [(n or "image", d) for n, d in items], reference_set or None)
        return {"batch_id": batch_id, "results": rows}

    @router.get("/records")
    def records(q: str = "", verdict: str | None = None, operator_verdict: str | None = None,
                reference_set: str | None = None, batch_id: str | None = None, limit: int = 100,
                offset: int = 0) -> list[dict[str, Any]]:
        found = wb.store.search(q, verdict, operator_verdict, reference_set, batch_id, min(limit, 1000),
                                offset)
        return [r.to_json() for r in found]

    @router.get("/records.csv", response_class=PlainTextResponse)
    def records_csv(q: str = "", verdict: str | None = None) -> PlainTextResponse:
        from anomaly_assistant.serve.records import records_csv as to_csv

        return PlainTextResponse(to_csv(wb.store.search(q, verdict, limit=100_000)), media_type="text/csv")

    @router.get("/records/{record_id}")
    def record(record_id: int) -> dict[str, Any]:
        return wb.store.get(record_id).to_json()

    @router.get("/records/{record_id}/report.html", response_class=HTMLResponse)
    def report(record_id: int) -> HTMLResponse:
        return HTMLResponse(wb.report_html(record_id))

    @router.get("/records/{record_id}/report.md", response_class=PlainTextResponse)
    def report_md(record_id: int) -> PlainTextResponse:
        return PlainTextResponse(wb.report_markdown(record_id), media_type="text/markdown")

    @router.get("/records/{record_id}/report.zip")
    def report_zip(record_id: int) -> Response:
        return Response(wb.report_zip(record_id), media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="inspection-{record_id}-markdown.zip"'})

    @router.post("/records/{record_id}/operator")
    def operator(record_id: int, request: OperatorRequest) -> dict[str, Any]:
        if request.verdict is not None and request.verdict not in OPERATOR_VERDICTS:
            raise UploadError(f"verdict must be one of {', '.join(OPERATOR_VERDICTS)}")
        wb.store.set_operator(record_id, request.verdict, request.note)
        return wb.store.get(record_id).to_json()

    @router.get("/reference-sets")
    def reference_sets() -> dict[str, list[str]]:
        return {name: [p.name for p in wb.store.reference_paths(name)] for name in wb.store.reference_sets()}

    @router.post("/reference-sets")
    async def create_reference_set(name: Annotated[str, Form()],
                                   images: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        uploads = [wb.check_upload(*(await _read(wb, f))) for f in images]
        paths = wb.save_reference_set(name, uploads)
        return {"name": name.strip(), "images": [p.name for p in paths]}

    app.include_router(router)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(KeyError)
    async def not_found(_: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"error": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    @app.exception_handler(Busy)
    async def busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": f"the request failed: {type(exc).__name__}: {exc}"}, status_code=500)


async def _run(fn: Any, *args: Any) -> Any:
    """Model work in a worker thread, so the event loop keeps serving health checks and the UI."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
