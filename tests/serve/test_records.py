"""Inspection records: round trip, search, CSV, reference sets, and survival of a `kill -9` mid-batch."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from anomaly_assistant.finding import Box, Finding
from anomaly_assistant.serve.records import RecordStore, check_set_name, records_csv, sha256


def _finding(i: int) -> Finding:
    return Finding(verdict="anomalous" if i % 2 else "normal", score=0.1 + i / 1000,
                   boxes=[Box(1, 2, 30 + i, 40)] if i % 2 else [], defect_type="scratch" if i % 2 else None,
                   rationale=f"rationale {i} " + "x" * 2000)


def test_round_trip_search_operator_and_csv(tmp_path):
    store = RecordStore(tmp_path / "records.db")
    ids = [store.add(_finding(i), image_name=f"part_{i}.png", input_hash=sha256(bytes([i])), model_id="tiny",
                     reference_set="line-3" if i < 2 else None) for i in range(4)]
    chat = [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "a scratch"}]
    store.set_chat(ids[1], chat)
    store.set_operator(ids[1], "overruled: normal", "reflection, not a scratch")
    rec = store.get(ids[1])
    assert (rec.verdict, rec.defect_type, rec.boxes) == ("anomalous", "scratch", [[1.0, 2.0, 31.0, 40.0]])
    assert rec.chat[1]["content"] == "a scratch" and rec.operator_note == "reflection, not a scratch"
    assert "anomaly_map" not in rec.to_json()["finding"]
    assert [r.id for r in store.search("REFLECTION")] == [ids[1]]
    assert [r.id for r in store.search(verdict="anomalous")] == [ids[3], ids[1]]
    assert [r.id for r in store.search(reference_set="line-3")] == [ids[1], ids[0]]
    assert ids[1] not in [r.id for r in store.search(operator_verdict="unreviewed")]
    with pytest.raises(ValueError, match="operator verdict"):
        store.set_operator(ids[0], "maybe", None)
    with pytest.raises(KeyError):
        store.get(999)
    rows = list(csv.DictReader(io.StringIO(records_csv(store.search()))))
    assert len(rows) == 4 and rows[2]["operator_verdict"] == "overruled: normal"
    assert rows[2]["chat_turns"] == "2"


def test_records_keep_map_source_and_old_records_without_it_still_load(tmp_path):
    import sqlite3

    store = RecordStore(tmp_path / "records.db")
    new = store.add(Finding(verdict="anomalous", score=0.9, source="expert", map_source="reference"),
                    image_name="new.png", input_hash=sha256(b"new"), model_id="expert-only")
    old = store.add(_finding(1), image_name="old.png", input_hash=sha256(b"old"), model_id="expert-only")
    assert store.get(new).to_json()["finding"]["map_source"] == "reference"
    # a row written before Finding.map_source: no key, the tag in a note
    legacy = _finding(1).to_json(include_map=False)
    del legacy["map_source"]
    legacy["notes"] = ["map source: reference", "kept"]
    store.close()
    with sqlite3.connect(tmp_path / "records.db") as db:
        db.execute("UPDATE inspections SET finding = ? WHERE id = ?", (json.dumps(legacy), old))
    store = RecordStore(tmp_path / "records.db")
    finding = store.get(old).to_json()["finding"]
    assert finding["map_source"] == "reference" and finding["notes"] == ["kept"]
    assert Finding.from_json(finding).map_source == "reference"
    del legacy["notes"]  # nor any notes at all
    store.close()
    with sqlite3.connect(tmp_path / "records.db") as db:
        db.execute("UPDATE inspections SET finding = ? WHERE id = ?", (json.dumps(legacy), old))
    store = RecordStore(tmp_path / "records.db")
    assert store.get(old).finding["map_source"] is None and store.get(old).finding["notes"] == []
    assert [r.image_name for r in store.search()] == ["old.png", "new.png"]


def test_reference_sets_persist_and_names_are_safe(tmp_path):
    store = RecordStore(tmp_path / "records.db")
    paths = store.save_reference_set("line 3", [("a.png", b"first"), ("b.png", b"second")])
    store.close()
    store = RecordStore(tmp_path / "records.db")
    assert store.reference_sets() == ["line 3"]
    assert store.reference_paths("line 3") == paths and paths[1].read_bytes() == b"second"
    store.save_reference_set("line 3", [("c.png", b"third")])
    assert [p.read_bytes() for p in store.reference_paths("line 3")] == [b"third"]
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="reference set name"):
            check_set_name(bad)
    with pytest.raises(KeyError):
        store.reference_paths("nope")


WRITER = textwrap.dedent("""
    import sys
    from anomaly_assistant.finding import Box, Finding
    from anomaly_assistant.serve.records import RecordStore
    store = RecordStore(sys.argv[1])
    i = 0
    while True:
        f = Finding(verdict="anomalous", score=0.5, boxes=[Box(0, 0, i, i)], defect_type="crack",
                    rationale=str(i) * 5000)
        rid = store.add(f, image_name=f"img_{i}.png", input_hash=str(i), model_id="tiny", batch_id="b1",
                        chat=[{"role": "assistant", "content": str(i) * 3000}])
        print(rid, i, flush=True)
        i += 1
""")


def test_kill_9_mid_batch_leaves_every_finished_record_whole(tmp_path):
    db = tmp_path / "records.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    finished = {}
    try:
        for line in proc.stdout:
            rid, i = map(int, line.split())
            finished[rid] = i
            if len(finished) >= 40:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = RecordStore(db)
    records = {r.id: r for r in store.search(batch_id="b1", limit=10_000)}
    assert set(finished) <= set(records)  # every inspection reported finished is there
    for rec in records.values():  # and none is half-written
        i = int(rec.image_name[4:-4])
        assert rec.rationale == str(i) * 5000 and rec.boxes == [[0.0, 0.0, float(i), float(i)]]
        assert json.loads(json.dumps(rec.finding))["rationale"] == rec.rationale
        assert rec.chat == [{"role": "assistant", "content": str(i) * 3000}]
