"""`serve`/`demo` command lines, HTTP Basic auth, zip batches and expert-only limits, in-process."""

import io
import zipfile

import pytest

from anomaly_assistant.resources import sample_images
from anomaly_assistant.serve.records import RecordStore

# torch, transformers and gradio are imported inside the tests: collecting this file must stay cheap, since
# every xdist worker collects every file and the worker that runs test_server.py starts its server after that.


def _workbench(*args, **kwargs):
    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.serve.service import Workbench

    return Workbench(AnomalyAssistant.expert_only(), *args, **kwargs)


def test_top_level_cli_lists_serve_and_demo(capsys):
    from anomaly_assistant.cli import available_commands
    from anomaly_assistant.cli import main as top_main

    assert {"serve", "demo"} <= set(available_commands())
    with pytest.raises(SystemExit) as done:  # argparse's --help, as in every command
        top_main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--auth", "--db", "--max-upload-mb", "--expert-only"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "USER:PASS"),
    (["--max-upload-mb", "0"], "--max-upload-mb"),
    (["--port", "99999"], "--port"),
    (["--no-such-flag"], "no-such-flag"),
    (["--batch-root", "/no/such/folder"], "--batch-root /no/such/folder: no such folder"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    from anomaly_assistant.serve.cli import main

    assert main(argv, command="serve") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_defaults_bind_loopback():
    from anomaly_assistant.serve.cli import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


def test_file_names_and_zip_members_are_never_paths():
    from anomaly_assistant.serve.service import UploadError, safe_name, zip_images

    assert safe_name("part 1 (left).png") == "part 1 (left).png"
    for bad in ("../x.png", "a/b.png", "..\\x.png", "x\x00.png"):
        with pytest.raises(UploadError, match="not a plain file name"):
            safe_name(bad)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../evil/a.png", b"x")
        z.writestr("sub/b.PNG", b"y")
        z.writestr("readme.txt", b"z")
        z.writestr("__MACOSX/._c.png", b"w")
    assert zip_images(buf.getvalue()) == [("a.png", b"x"), ("b.PNG", b"y")]
    with pytest.raises(UploadError, match="not a zip"):
        zip_images(b"PK nope")


@pytest.fixture(scope="module")
def expert_client(tmp_path_factory):
    """Expert-only assistant (nothing loads until references are matched) behind auth."""
    from fastapi.testclient import TestClient

    from anomaly_assistant.serve.app import create_app

    store = RecordStore(tmp_path_factory.mktemp("auth") / "records.db")
    wb = _workbench(store, "expert-only", max_upload_mb=1)
    with TestClient(create_app(wb, auth=("inspector", "s3cret"))) as client:
        yield client


def test_api_needs_the_credentials_when_auth_is_set(expert_client):
    assert expert_client.get("/api/health").status_code == 401
    assert expert_client.get("/api/health", auth=("inspector", "wrong")).status_code == 401
    health = expert_client.get("/api/health", auth=("inspector", "s3cret")).json()
    assert health["has_llm"] is False and "Expert-only" in health["banner"]


def test_expert_only_needs_references_and_cannot_chat(expert_client):
    auth = ("inspector", "s3cret")
    files = {"image": ("scratch.png", sample_images()[1].read_bytes(), "image/png")}
    out = expert_client.post("/api/inspect", files=files, auth=auth)
    assert out.status_code == 400 and "needs reference images" in out.json()["error"]
    out = expert_client.post("/api/batch", files={"zip": ("b.zip", b"not a zip")}, auth=auth)
    assert out.status_code == 400 and "not a zip" in out.json()["error"]
    out = expert_client.post("/api/batch", data={"folder": "/tmp"}, auth=auth)  # no --batch-root: off
    assert out.status_code == 403 and "start it with --batch-root DIR" in out.json()["error"]
    out = expert_client.post("/api/reference-sets", data={"name": "../up"},
                             files=[("images", ("g.png", sample_images()[0].read_bytes()))], auth=auth)
    assert out.status_code == 400 and "reference set name" in out.json()["error"]


def test_the_ui_asks_for_the_login_too(expert_client):
    assert expert_client.get("/config").status_code == 401
    login = expert_client.post("/login", data={"username": "inspector", "password": "s3cret"})
    assert login.status_code == 200
    assert expert_client.get("/config").status_code == 200


def test_a_model_that_does_not_load_is_one_line_and_exit_1(tmp_path, capsys):
    from anomaly_assistant.serve.cli import main

    assert main(["--model", str(tmp_path / "no-model"), "--db", str(tmp_path / "r.db")], command="serve") == 1
    err = capsys.readouterr().err
    assert err.startswith("anomaly-assistant serve: error:") and err.count("\n") == 1


def test_a_caller_that_waits_too_long_for_the_model_gets_busy(tmp_path):
    import threading

    from anomaly_assistant.serve.service import Busy

    wb = _workbench(RecordStore(tmp_path / "r.db"), "expert-only", concurrency=1, queue_timeout_s=0.2)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with wb.slot():
            holding.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    holding.wait(5)
    with pytest.raises(Busy, match="busy"):
        with wb.slot():
            pass
    release.set()
    worker.join()
    with wb.slot():  # free again
        pass


def test_folder_batches_stay_inside_the_batch_root_after_symlinks(tmp_path):
    from anomaly_assistant.serve.service import UploadError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "line3").mkdir(parents=True)
    outside.mkdir()
    good = sample_images()[0].read_bytes()
    (root / "line3" / "a.png").write_bytes(good)
    (outside / "secret.png").write_bytes(good)
    (root / "line3" / "b.png").symlink_to(outside / "secret.png")  # a file that leads out of the root
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a folder that leads out
    wb = _workbench(RecordStore(tmp_path / "r.db"), "expert-only", batch_root=root)
    for name in ("line3", str(root / "line3"), "line3/../line3"):
        items = wb.folder_items(name)
        assert [n for n, _ in items] == ["a.png", "b.png"] and items[0][1] == good
        assert isinstance(items[1][1], UploadError) and "links outside the batch root" in str(items[1][1])
    for name in ("escape", "..", "line3/../..", str(outside), "/"):
        with pytest.raises(UploadError, match="outside the batch root") as refused:
            wb.folder_items(name)
        assert refused.value.status == 403
    with pytest.raises(UploadError, match="no such folder"):
        wb.folder_items("line3/a.png")
    # the refused file becomes that row of the batch, with no model work
    _, rows = wb.batch([("b.png", wb.folder_items("line3")[1][1])])
    assert rows[0]["record_id"] is None and "links outside the batch root" in rows[0]["error"]
    with pytest.raises(UploadError, match="--batch-root DIR") as off:
        _workbench(wb.store, "expert-only").folder_items("line3")
    assert off.value.status == 403


def test_batch_table_filters_by_verdict_and_sorts():
    from anomaly_assistant.serve.app import _batch_table

    rows = [{"name": n, "record_id": i or None, "verdict": v, "score": sc, "defect_type": None, "boxes": 0,
             "error": None if v else "not an image", "thumb": f"![t{i}](data:x)"}
            for i, (n, v, sc) in enumerate([("bad.png", None, None), ("B.png", "anomalous", 0.9),
                                             ("a.png", "normal", 0.1), ("c.png", "anomalous", 0.7)])]
    names = lambda table: [r[2] for r in table]  # noqa: E731
    assert names(_batch_table(rows, "all", "batch order")) == ["bad.png", "B.png", "a.png", "c.png"]
    assert names(_batch_table(rows, "all", "score, highest first")) == ["B.png", "c.png", "a.png", "bad.png"]
    assert names(_batch_table(rows, "all", "score, lowest first")) == ["a.png", "c.png", "B.png", "bad.png"]
    assert names(_batch_table(rows, "all", "image name")) == ["a.png", "B.png", "bad.png", "c.png"]
    assert names(_batch_table(rows, "anomalous", "score, lowest first")) == ["c.png", "B.png"]
    assert names(_batch_table(rows, "normal", "batch order")) == ["a.png"]
    assert names(_batch_table(rows, "errors", "batch order")) == ["bad.png"]
    assert _batch_table(rows, "normal", "batch order")[0][0] == "![t2](data:x)"  # the thumbnail is column 1
