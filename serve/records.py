"""Inspection records and named reference sets in one SQLite file (WAL): a crash loses nothing finished.

Every inspection is one row written in one transaction (the Finding, the input's hash and stored copy, the
model, the reference set, the chat so far); an inspector's confirm/overrule and note update the same row,
which makes the table the start of a labelled set. WAL with `synchronous=FULL` means a `kill -9` at any
moment leaves each row either fully there or absent. Images are written to disk *before* the row that names
them is committed, so a committed row never points at a missing file.

Named reference sets ("line 3 brackets") keep their good images as files under `<root>/refsets/<name>/`,
named by content hash; the set's rows are replaced in one transaction.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomaly_assistant.finding import Finding, split_legacy_map_source

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
OPERATOR_VERDICTS = ("confirmed", "overruled: normal", "overruled: anomalous")
CSV_FIELDS = ("id", "created_at", "image_name", "input_hash", "model_id", "reference_set", "verdict",
              "score", "defect_type", "boxes", "rationale", "operator_verdict", "operator_note", "batch_id",
              "chat_turns")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    input_hash TEXT NOT NULL,
    image_name TEXT NOT NULL,
    image_path TEXT,
    overlay_path TEXT,
    model_id TEXT NOT NULL,
    reference_set TEXT,
    verdict TEXT NOT NULL,
    score REAL,
    boxes TEXT NOT NULL,
    defect_type TEXT,
    rationale TEXT NOT NULL,
    finding TEXT NOT NULL,
    chat TEXT NOT NULL DEFAULT '[]',
    operator_verdict TEXT,
    operator_note TEXT,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS inspections_created ON inspections(created_at);
CREATE TABLE IF NOT EXISTS reference_sets (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reference_images (
    set_name TEXT NOT NULL REFERENCES reference_sets(name) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    file_name TEXT NOT NULL,
    stored_path TEXT NOT NULL,
    PRIMARY KEY (set_name, position)
);
"""


def sha256(data: bytes) -> str:
    """The input hash recorded for every inspection (hex SHA-256 of the uploaded bytes)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Record:
    """One inspection as stored: the fields of the table, with JSON columns decoded."""

    id: int
    created_at: float
    updated_at: float
    input_hash: str
    image_name: str
    image_path: str | None
    overlay_path: str | None
    model_id: str
    reference_set: str | None
    verdict: str
    score: float | None
    boxes: list[list[float]]
    defect_type: str | None
    rationale: str
    finding: dict[str, Any]
    chat: list[dict[str, str]]
    operator_verdict: str | None
    operator_note: str | None
    batch_id: str | None

    def to_json(self) -> dict[str, Any]:
        """The record for the HTTP API (the Finding without its map, which is large)."""
        out = dict(self.__dict__)
        out["finding"] = {k: v for k, v in self.finding.items() if k != "anomaly_map"}
        return out


class RecordStore:
    """The records database; safe to share between threads (one connection, one lock, short transactions)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.path.parent
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement in its own transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cur

    # -- inspections ----------------------------------------------------------------------
    def add(self, finding: Finding, *, image_name: str, input_hash: str, model_id: str,
            image_path: str | None = None, overlay_path: str | None = None, reference_set: str | None = None,
            chat: list[dict] | None = None, batch_id: str | None = None) -> int:
        """Store one finished inspection; returns its id. The whole row is committed or nothing is."""
        now = time.time()
        data = finding.to_json(include_map=False)
        values = {"created_at": now, "updated_at": now, "input_hash": input_hash, "image_name": image_name,
                  "image_path": image_path, "overlay_path": overlay_path, "model_id": model_id,
                  "reference_set": reference_set, "verdict": finding.verdict, "score": data["score"],
                  "boxes": json.dumps(data["boxes"]), "defect_type": finding.defect_type,
                  "rationale": finding.rationale or "", "finding": json.dumps(data),
                  "chat": json.dumps(chat or []), "batch_id": batch_id}
        marks = ", ".join("?" * len(values))
        columns = ", ".join(values)
        cur = self._write(f"INSERT INTO inspections ({columns}) VALUES ({marks})", list(values.values()))
        return int(cur.lastrowid)

    def set_chat(self, record_id: int, chat: list[dict]) -> None:
        """Replace the record's chat with the session's whole history."""
        self._update(record_id, "chat = ?", (json.dumps(chat),))

    def set_operator(self, record_id: int, verdict: str | None, note: str | None) -> None:
        """The inspector's call on the model's verdict ("confirmed" / "overruled: ...") and a free note."""
        if verdict is not None and verdict not in OPERATOR_VERDICTS:
            allowed = ", ".join(OPERATOR_VERDICTS)
            raise ValueError(f"operator verdict must be one of {allowed}, not {verdict!r}")
        self._update(record_id, "operator_verdict = ?, operator_note = ?", (verdict, note or None))

    def _update(self, record_id: int, assignments: str, params: tuple) -> None:
        cur = self._write(f"UPDATE inspections SET {assignments}, updated_at = ? WHERE id = ?",
                          (*params, time.time(), int(record_id)))
        if cur.rowcount == 0:
            raise KeyError(f"no inspection record {record_id}")

    def get(self, record_id: int) -> Record:
        """One record by id; KeyError when there is none."""
        with self._lock:
            row = self._db.execute("SELECT * FROM inspections WHERE id = ?", (int(record_id),)).fetchone()
        if row is None:
            raise KeyError(f"no inspection record {record_id}")
        return _record(row)

    def search(self, text: str = "", verdict: str | None = None, operator_verdict: str | None = None,
               reference_set: str | None = None, batch_id: str | None = None, limit: int = 200,
               offset: int = 0) -> list[Record]:
        """Newest first. `text` matches image name, defect type, rationale, note or hash (case-insensitive).

        `operator_verdict="unreviewed"` selects records no inspector has judged yet.
        """
        where, params = [], []
        if text:
            like = f"%{text.lower()}%"
            where.append("(lower(image_name) LIKE ? OR lower(coalesce(defect_type, '')) LIKE ?"
                         " OR lower(rationale) LIKE ? OR lower(coalesce(operator_note, '')) LIKE ?"
                         " OR input_hash LIKE ?)")
            params += [like] * 5
        if verdict:
            where.append("verdict = ?")
            params.append(verdict)
        if operator_verdict == "unreviewed":
            where.append("operator_verdict IS NULL")
        elif operator_verdict:
            where.append("operator_verdict = ?")
            params.append(operator_verdict)
        if reference_set:
            where.append("reference_set = ?")
            params.append(reference_set)
        if batch_id:
            where.append("batch_id = ?")
            params.append(batch_id)
        sql = "SELECT * FROM inspections" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, (*params, int(limit), int(offset))).fetchall()
        return [_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM inspections").fetchone()[0])

    # -- reference sets ----------------------------------------------------------------------
    def save_reference_set(self, name: str, images: Iterable[tuple[str, bytes]]) -> list[Path]:
        """Create or replace a named set from (file name, image bytes); the caller validated the images."""
        name = check_set_name(name)
        folder = self.root / "refsets" / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for position, (file_name, data) in enumerate(images):
            stored = folder / f"{sha256(data)[:16]}{Path(file_name).suffix.lower() or '.png'}"
            if not stored.exists():
                _write_file(stored, data)
            rows.append((name, position, file_name, str(stored)))
        if not rows:
            raise ValueError("a reference set needs at least one good image")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO reference_sets (name, created_at) VALUES (?, ?)",
                                 (name, time.time()))
                self._db.execute("DELETE FROM reference_images WHERE set_name = ?", (name,))
                self._db.executemany("INSERT INTO reference_images VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Path(r[3]) for r in rows]

    def reference_sets(self) -> list[str]:
        """Names of the stored sets, sorted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM reference_sets ORDER BY name")]

    def reference_paths(self, name: str) -> list[Path]:
        """The stored image files of a set; KeyError when the set does not exist."""
        with self._lock:
            rows = self._db.execute("SELECT stored_path FROM reference_images WHERE set_name = ?"
                                    " ORDER BY position", (name,)).fetchall()
        if not rows:
            raise KeyError(f"no reference set named {name!r}")
        return [Path(r[0]) for r in rows]

    def store_file(self, folder: str, data: bytes, suffix: str) -> Path:
        """Keep a file by content hash under `<root>/<folder>/` (inspected images, overlays), atomically."""
        path = self.root / folder / f"{sha256(data)}{suffix}"
        if not path.exists():
            _write_file(path, data)
        return path


def check_set_name(name: str) -> str:
    """A reference-set name safe as a folder name: letters, digits, space, `_.-`, at most 64 characters."""
    name = (name or "").strip()
    if not SET_NAME.match(name) or ".." in name:
        raise ValueError(f"reference set name {name!r}: use 1-64 letters, digits, spaces, '_', '.', '-'")
    return name


def records_csv(records: Iterable[Record]) -> str:
    """The records as CSV (one row per inspection; boxes as JSON, chat as its number of turns)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in records:
        row = {k: getattr(r, k, None) for k in CSV_FIELDS}
        row["created_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        row["boxes"] = json.dumps(r.boxes)
        row["chat_turns"] = len(r.chat)
        writer.writerow(row)
    return out.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename: a crash never leaves a truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _record(row: sqlite3.Row) -> Record:
    d = dict(row)
    d["boxes"] = json.loads(d["boxes"])
    finding = json.loads(d["finding"])
    # Records written before Finding.map_source carry it as a "map source: X" note: same shape as new ones.
    finding["map_source"], finding["notes"] = split_legacy_map_source(finding)
    d["finding"] = finding
    d["chat"] = json.loads(d["chat"])
    return Record(**d)
