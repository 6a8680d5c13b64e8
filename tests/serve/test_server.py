"""The workbench over real HTTP and in a real browser, against one `demo` server (tiny model) per module.

Order matters only at the end: the last test kills the server with SIGKILL in the middle of a batch.
"""

import io
import json
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from anomaly_assistant.resources import sample_images, sample_references
from anomaly_assistant.serve.records import RecordStore

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "screenshots"  # gitignored test artifacts

pytestmark = pytest.mark.slow  # one server start (model load + reference warm-up) for the module

DEMO_SET = "demo samples"
SCRATCH, STAIN = sample_images()[1], sample_images()[2]


def _png_header_only_giant(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit 20000x20000 PNG (all black) built row by row: about 50 KB, 400 megapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(SCRATCH).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _inspect(server, path=SCRATCH, **data):
    with open(path, "rb") as f:
        return server.http.post("/api/inspect", files={"image": (path.name, f, "image/png")}, data=data)


def test_health_and_openapi(server):
    health = server.http.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and DEMO_SET in health["reference_sets"]
    assert "Untrained" in health["banner"]
    paths = server.http.get("/api/openapi.json").json()["paths"]
    assert {"/api/inspect", "/api/chat", "/api/batch", "/api/records", "/api/health"} <= set(paths)


def test_inspect_with_a_named_set_and_with_uploaded_references(server):
    out = _inspect(server, reference_set=DEMO_SET)
    assert out.status_code == 200, out.text
    finding = out.json()["finding"]
    assert finding["verdict"] == "anomalous" and finding["boxes"] and finding["image"] == SCRATCH.name
    rec = server.http.get(f"/api/records/{out.json()['record_id']}").json()
    assert rec["reference_set"] == DEMO_SET and rec["boxes"] == finding["boxes"]
    assert len(rec["input_hash"]) == 64
    refs = [("references", (p.name, p.read_bytes(), "image/png")) for p in sample_references()]
    out = server.http.post("/api/inspect", files=[("image", ("clean.png", sample_images()[0].read_bytes())),
                                                  *refs], data={"include_map": "true"})
    assert out.status_code == 200, out.text
    assert out.json()["finding"]["verdict"] == "normal" and "anomaly_map" in out.json()["finding"]


def test_chat_keeps_each_sessions_history_apart(server):
    a = _inspect(server, reference_set=DEMO_SET).json()["session_id"]
    b = _inspect(server, STAIN, reference_set=DEMO_SET).json()["session_id"]
    ra = server.http.post("/api/chat", json={"session_id": a, "message": "What caused it?"}).json()
    rb = server.http.post("/api/chat", json={"session_id": b, "message": "Is it safe to ship?"}).json()
    assert isinstance(ra["reply"], str) and len(ra["history"]) == 4 and len(rb["history"]) == 4
    assert ra["history"][2]["content"] == "What caused it?"
    assert rb["history"][2]["content"] == "Is it safe to ship?"
    ra2 = server.http.post("/api/chat", json={"session_id": a, "message": "And how to prevent it?"}).json()
    assert [t["content"] for t in ra2["history"][2::2]] == ["What caused it?", "And how to prevent it?"]
    assert server.http.get(f"/api/records/{ra2['record_id']}").json()["chat"] == ra2["history"]
    gone = server.http.post("/api/chat", json={"session_id": "nope", "message": "hi"})
    assert gone.status_code == 404 and "inspect the image again" in gone.json()["error"]


def test_batch_records_operator_and_csv(server):
    files = [("images", ("b_scratch.png", SCRATCH.read_bytes())),
             ("images", ("b_stain.png", STAIN.read_bytes())), ("images", ("b_text.png", b"not an image"))]
    out = server.http.post("/api/batch", files=files, data={"reference_set": DEMO_SET})
    assert out.status_code == 200, out.text
    rows = out.json()["results"]
    assert [r["verdict"] for r in rows] == ["anomalous", "anomalous", None]
    assert "not an image" in rows[2]["error"]
    found = server.http.get("/api/records", params={"batch_id": out.json()["batch_id"]}).json()
    assert sorted(r["image_name"] for r in found) == ["b_scratch.png", "b_stain.png"]
    rid = rows[0]["record_id"]
    bad = server.http.post(f"/api/records/{rid}/operator", json={"verdict": "maybe"})
    assert bad.status_code == 400
    ok = server.http.post(f"/api/records/{rid}/operator",
                          json={"verdict": "confirmed", "note": "deep scratch"})
    assert ok.json()["operator_verdict"] == "confirmed"
    assert [r["id"] for r in server.http.get("/api/records", params={"q": "deep scratch"}).json()] == [rid]
    csv_text = server.http.get("/api/records.csv").text
    assert csv_text.startswith("id,created_at,image_name") and "deep scratch" in csv_text
    assert "data:image/png;base64" in server.http.get(f"/api/records/{rid}/report.html").text
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("line3/z_scratch.png", SCRATCH.read_bytes())
        z.writestr("line3/z_notes.txt", "ignored")
    out = server.http.post("/api/batch", files={"zip": ("parts.zip", buf.getvalue(), "application/zip")},
                           data={"reference_set": DEMO_SET})
    assert [(r["name"], r["verdict"]) for r in out.json()["results"]] == [("z_scratch.png", "anomalous")]


def test_markdown_report_zip_holds_report_md_and_the_overlay(server):
    rid = _inspect(server, reference_set=DEMO_SET).json()["record_id"]
    server.http.post(f"/api/records/{rid}/operator", json={"verdict": "confirmed", "note": "a | b *c*"})
    md = server.http.get(f"/api/records/{rid}/report.md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    text = md.text
    assert text.startswith(f"# Inspection {rid}: anomalous\n") and "](overlay.png)" in text
    assert "| **Operator note** | a \\| b \\*c\\* |" in text  # a note cannot break the table or add markup
    assert "scratch.png" in text and "## Rationale" in text
    out = server.http.get(f"/api/records/{rid}/report.zip")
    assert out.status_code == 200 and out.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(out.content)) as z:
        assert sorted(z.namelist()) == [f"inspection-{rid}/overlay.png", f"inspection-{rid}/report.md"]
        assert z.read(f"inspection-{rid}/report.md").decode() == text
        overlay = Image.open(io.BytesIO(z.read(f"inspection-{rid}/overlay.png")))
    stored = server.http.get(f"/api/records/{rid}").json()["overlay_path"]
    assert overlay.format == "PNG" and overlay.size == Image.open(stored).size


def test_folder_batches_read_only_under_the_batch_root(server):
    """`demo` sets --batch-root to the bundled samples: a folder under it batches, anything else is 403."""
    out = server.http.post("/api/batch", data={"folder": "test", "reference_set": DEMO_SET})
    assert out.status_code == 200, out.text
    assert [(r["name"], r["verdict"]) for r in out.json()["results"]] == [
        ("clean.png", "normal"), ("scratch.png", "anomalous"), ("stain.png", "anomalous")]
    outside = [str(SCRATCH.parents[3]), "../..", "test/../../..", "/etc"]
    for folder in outside:
        out = server.http.post("/api/batch", data={"folder": folder, "reference_set": DEMO_SET})
        assert out.status_code == 403, (folder, out.text)
        assert "outside the batch root" in out.json()["error"]
    out = server.http.post("/api/batch", data={"folder": "no-such-dir", "reference_set": DEMO_SET})
    assert out.status_code == 400 and "no such folder" in out.json()["error"]
    assert server.alive()


BAD_INPUTS = {
    "zero_bytes": ("empty.png", b"", 400, "empty"),
    "truncated_jpeg": ("cut.jpg", _truncated_jpeg(), 400, "not a readable image"),
    "giant_png": ("giant.png", _png_header_only_giant(), 413, "too large"),
    "text_as_png": ("notes.png", b"just some text, not a picture\n" * 10, 400, "not an image"),
    "over_size_limit": ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (6 * 2**20), 413, "over the upload limit"),
    "path_traversal": ("../../etc/evil.png", SCRATCH.read_bytes(), 400, "not a plain file name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_a_clear_error_and_the_server_stays_up(server, case):
    name, data, status, message = BAD_INPUTS[case]
    out = server.http.post("/api/inspect", files={"image": (name, data, "image/png")},
                           data={"reference_set": DEMO_SET})
    assert out.status_code == status, out.text
    assert message in out.json()["error"]
    assert server.alive()


def test_the_ui_never_hands_out_the_records_database(server):
    assert server.http.get(f"/gradio_api/file={server.db}").status_code in (403, 404)


def test_unknown_reference_set_and_expert_needs(server):
    out = _inspect(server, reference_set="no such set")
    assert out.status_code == 400 and "no reference set named" in out.json()["error"]


def _upload(page, *paths: Path) -> None:
    """Choose files in the upload box; again if the page was not listening yet (seen right after load)."""
    for _ in range(3):
        page.locator("#images input[type=file]").set_input_files([str(p) for p in paths])
        try:
            for path in paths:
                page.wait_for_selector(f"#images >> text={path.stem}", timeout=15_000)
            return
        except Exception:
            print(f"upload of {[p.name for p in paths]} not picked up; trying again")
            continue
    raise AssertionError(f"{[p.name for p in paths]} never showed in the upload box")


def test_browser_inspect_chat_note_export_history(server, chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    note = f"checked by hand {time.time():.0f}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        page.goto(server.url)
        page.wait_for_selector("#inspect-btn")
        assert "Untrained demo model" in page.inner_text("#banner")
        page.wait_for_selector("text=or pick a sample")
        page.screenshot(path=SCREENSHOTS / "1_start.png", full_page=True)

        fake = SCREENSHOTS / "not_an_image.png"  # a text file renamed .png: refused with a message, no crash
        fake.write_text("hello, I am text")
        _upload(page, fake)
        page.click("#inspect-btn")
        page.wait_for_selector("#details >> text=not an image (content is not PNG")
        assert page.inner_text("#verdict-badge") == "NOT INSPECTED"
        page.screenshot(path=SCREENSHOTS / "1b_refused_upload.png", full_page=True)
        fake.unlink()
        page.click("#images button[aria-label='Clear']")
        page.wait_for_function("!document.querySelector('#images').innerText.includes('not_an_image')")
        page.wait_for_selector("#images input[type=file]", state="attached")

        _upload(page, SCRATCH)
        page.click("#inspect-btn")
        page.wait_for_function("document.querySelector('#verdict-badge').innerText !== 'NOT INSPECTED'")
        assert page.inner_text("#verdict-badge") == "ANOMALOUS"
        page.wait_for_selector("#overlay img")
        assert "#1 (" in page.inner_text("#details")  # numbered boxes listed beside the overlay
        assert "not_an_image" not in page.inner_text("#details")
        page.screenshot(path=SCREENSHOTS / "2_inspected.png", full_page=True)

        page.fill("#question textarea", "What could have caused this?")
        page.click("#ask-btn")
        page.wait_for_function("document.querySelectorAll('#chat .message').length >= 2")
        page.wait_for_selector("#chat >> text=What could have caused this?")
        page.screenshot(path=SCREENSHOTS / "3_chat.png", full_page=True)

        page.click("#op-verdict >> text=confirmed")
        page.fill("#op-note textarea", note)
        page.click("#op-save")
        page.wait_for_selector("#op-msg >> text=Saved on record")
        page.click("#export-btn")
        page.wait_for_selector("#export-files >> text=.html")
        exported = page.inner_text("#export-files")
        assert ".json" in exported and "inspection-" in exported and "-markdown\n.zip" in exported
        page.screenshot(path=SCREENSHOTS / "4_note_export.png", full_page=True)

        page.get_by_role("tab", name="History").click()
        page.fill("#history-query textarea", note)
        page.click("#history-search")
        in_table = "n => document.querySelector('#history-table').innerText.includes(n)"
        page.wait_for_function(in_table, arg=note)
        assert "scratch.png" in page.inner_text("#history-table")
        page.screenshot(path=SCREENSHOTS / "5_history.png", full_page=True)

        page.get_by_role("tab", name="Batch").click()
        page.fill("#batch-folder textarea", "/etc")  # outside the demo's --batch-root: refused, said why
        page.click("#batch-btn")
        page.wait_for_selector("text=outside the batch root")
        page.screenshot(path=SCREENSHOTS / "6a_batch_outside_root.png", full_page=True)
        page.locator(".toast-close").first.click()  # dismiss the message so it covers nothing later
        page.fill("#batch-folder textarea", str(SCRATCH.parent))
        page.click("#batch-btn")
        table = "document.querySelector('#batch-table').innerText"
        page.wait_for_function(f"{table}.includes('stain.png')")
        page.wait_for_selector("#batch-gallery img")
        # one thumbnail per row (gradio also keeps a hidden copy of the widest cell to size the column)
        thumbs = page.locator("#batch-table img[src^='data:image/jpeg;base64,'] >> visible=true")
        thumbs.nth(2).wait_for()
        assert thumbs.count() == 3
        page.screenshot(path=SCREENSHOTS / "6_batch.png", full_page=True)

        def order() -> list[str]:
            text = page.inner_text("#batch-table")
            return sorted((n for n in ("clean.png", "scratch.png", "stain.png") if n in text), key=text.index)

        page.click("#batch-sort >> text=score, lowest first")
        page.wait_for_function(f"{table}.indexOf('clean.png') < {table}.indexOf('stain.png')")
        assert order()[0] == "clean.png"
        page.click("#batch-sort >> text=score, highest first")
        page.wait_for_function(f"{table}.indexOf('clean.png') > {table}.indexOf('stain.png')")
        assert order()[-1] == "clean.png"
        page.click("#batch-show >> text=normal")
        page.wait_for_function(f"!{table}.includes('stain.png')")
        assert order() == ["clean.png"] and thumbs.count() == 1
        page.screenshot(path=SCREENSHOTS / "6b_batch_normal_only.png", full_page=True)
        page.click("#batch-show >> text=anomalous")
        page.wait_for_function(f"!{table}.includes('clean.png')")
        assert sorted(order()) == ["scratch.png", "stain.png"]

        page.get_by_role("tab", name="Inspect").click()  # pick a bundled sample instead of uploading
        page.click("#images button[aria-label='Clear']")
        page.locator(".gallery-item").nth(0).click()
        page.wait_for_selector("#pasted img")
        page.click("#inspect-btn")
        page.wait_for_function("document.querySelector('#verdict-badge').innerText === 'NORMAL'")
        assert "clean.png" in page.inner_text("#details")
        page.screenshot(path=SCREENSHOTS / "7_sample_picked.png", full_page=True)

        # several images at once: a picker lists the results
        page.click("#pasted button[aria-label='Remove Image']")
        _upload(page, STAIN, SCRATCH)
        page.click("#inspect-btn")
        page.wait_for_selector("#pick input", state="visible")
        page.wait_for_function("document.querySelector('#details').innerText.includes('stain.png')")
        page.screenshot(path=SCREENSHOTS / "8_several_images.png", full_page=True)
        browser.close()
    rec = server.http.get("/api/records", params={"q": note}).json()[0]
    assert rec["operator_verdict"] == "confirmed" and len(rec["chat"]) == 4


def test_kill_9_during_a_batch_keeps_every_finished_inspection_whole(server):
    """Last in the module: it kills the module's server."""
    files = [("images", (f"kill_{i:02d}.png", (SCRATCH if i % 2 else STAIN).read_bytes())) for i in range(40)]

    def post() -> None:
        try:
            server.http.post("/api/batch", files=files, data={"reference_set": DEMO_SET})
        except Exception:
            pass  # the server dies mid-request

    threading.Thread(target=post, daemon=True).start()
    store = RecordStore(server.db)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.search("kill_", limit=100)) < 3:
        time.sleep(0.05)
    before = len(store.search("kill_", limit=100))
    server.proc.kill()  # SIGKILL: no cleanup runs
    server.proc.wait()
    store.close()
    assert before >= 3
    store = RecordStore(server.db)  # "restart": reopen the records
    records = store.search("kill_", limit=100)
    assert before <= len(records) < 40
    for rec in records:
        assert rec.verdict == "anomalous" and rec.boxes and rec.reference_set == DEMO_SET
        assert json.loads(json.dumps(rec.finding))["image"] == rec.image_name
        assert Image.open(rec.overlay_path).size[0] > 0 and open(rec.image_path, "rb").read()
