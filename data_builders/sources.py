"""Dataset readers: every published layout the project uses, into one `Record` list.

All readers are plain functions `read_x(path, ..., skips=None) -> list[Record]`. They check what is cheap
(file exists, stays inside the dataset root, image header opens, mask size equals image size) and log every
refusal in `skips`; a full decode of every pixel happens once, at build time (`records.validate_records`).

Layouts (exactly as published):
- MVTec AD / MPDD / BTAD / MVTec LOCO / magnetic tiles:
  `<cat>/{train,validation,test}/<defect|good|ok>/*.png`, masks `<cat>/ground_truth/<defect>/<stem>_mask.png`
  (MVTec, MPDD), `<stem>.png|.bmp` (BTAD) or a folder `<stem>/*.png` of several masks (LOCO, read as their
  union).
- VisA: `split_csv/1cls.csv` (object,split,label,image,mask) + `<cat>/image_anno.csv` (image,label,mask; label
  is the defect description) + `<cat>/Data/{Images,Masks}/{Normal,Anomaly}/`.
- DeepPCB: `PCBData/groupN/N/<id>_test.jpg`, `<id>_temp.jpg`, boxes `groupN/N_not/<id>.txt`
  (`x1,y1,x2,y2,type` per line, comma or space separated), optional `trainval.txt` / `test.txt` split lists.
- Anomaly-Instruct-125k and VisA-D&R: LLaVA conversation JSON (list of {id, image, conversations, metadata}).
- MMAD: one JSON object keyed by image path, each with image_path, mask_path, similar_templates,
  random_templates and conversation (Question / Answer letter / Options / type).
- Generic: a folder `<root>/[<category>/]{good,<defect>}/*` with optional masks under
  `<root>/masks/<defect>/`, or a CSV / JSONL manifest with columns
  image,label[,mask,boxes,defect_type,category,split,reference].
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from anomaly_assistant.data_builders.records import (
    GOOD_NAMES,
    Record,
    SkipLog,
    is_image_file,
    load_mask,
    resolve_inside,
)
from anomaly_assistant.localize import boxes_from_map
from anomaly_assistant.scoring import read_verdict, verdict_word

DEEPPCB_TYPES = {1: "open", 2: "short", 3: "mousebite", 4: "spur", 5: "copper", 6: "pin-hole"}
MVTEC_SPLITS = ("train", "validation", "test")


def _header_size(path: Path, skips: SkipLog) -> tuple[int, int] | None:
    """Image size from the header only (fast); logs 0-byte and non-image files."""
    try:
        if path.stat().st_size == 0:
            skips.add(path, "empty file: 0 bytes")
            return None
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        skips.add(path, "missing file: not found")
    except Exception as exc:
        skips.add(path, f"unreadable image: {type(exc).__name__}: {exc}"[:300])
    return None


def _listed_file(root: Path, rel: str, where: str, what: str, skips: SkipLog) -> Path | None:
    """A path named in a manifest -> the file inside `root`, or None with the reason logged.

    `where` locates the manifest row (logged when the path escapes the root); `what` completes
    "missing file: ..." (e.g. "listed in the JSON", "mask listed in the split CSV").
    """
    path = resolve_inside(root, rel)
    if path is None:
        skips.add(where, "path escapes dataset root")
        return None
    if not path.is_file():
        skips.add(path, f"missing file: {what}")
        return None
    return path


def _with_mask(rec: Record, size: tuple[int, int], skips: SkipLog, with_boxes: bool) -> Record | None:
    """Check the mask against the image and derive boxes from it; None (logged) when the mask is bad."""
    if rec.gt_mask is None:
        return rec
    mask, reason = load_mask(rec.gt_mask, size)
    if mask is None:
        skips.add(rec.gt_mask, reason or "bad mask")
        return None
    if with_boxes and not rec.gt_boxes:
        rec.gt_boxes = [b.as_list() for b in boxes_from_map(mask)]
    return rec


def _sorted_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))


# --------------------------------------------------------------------------------------------- MVTec family


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png", f"{stem}.bmp", f"{stem}_mask.bmp", f"{stem}.tif"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    if (gt_dir / stem).is_dir():  # MVTec LOCO: one folder of masks per image
        return gt_dir / stem
    return None


def _mvtec_categories(root: Path) -> list[Path]:
    if any((root / s).is_dir() for s in MVTEC_SPLITS):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / s).is_dir() for s in MVTEC_SPLITS))


def read_mvtec(
    root: str | os.PathLike,
    category: str | None = None,
    split: str | None = None,
    skips: SkipLog | None = None,
    source: str = "mvtec",
    with_boxes: bool = True,
) -> list[Record]:
    """MVTec AD layout (also MPDD, BTAD, MVTec LOCO, magnetic tiles).

    `root` is the dataset or one category.
    """
    skips = skips if skips is not None else SkipLog()
    root = Path(root)
    if not root.is_dir():
        skips.add(root, "missing file: dataset root not found")
        return []
    records: list[Record] = []
    for cat_dir in _mvtec_categories(root):
        if category is not None and cat_dir.name != category:
            continue
        for sp in MVTEC_SPLITS:
            if split is not None and sp != split:
                continue
            split_dir = cat_dir / sp
            if not split_dir.is_dir():
                continue
            for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                is_good = defect_dir.name.lower() in GOOD_NAMES
                for img in _sorted_images(defect_dir):
                    size = _header_size(img, skips)
                    if size is None:
                        continue
                    mask = (
                        None if is_good else _find_mask(cat_dir / "ground_truth" / defect_dir.name, img.stem)
                    )
                    rec = Record(
                        image_path=str(img),
                        gt_label=0 if is_good else 1,
                        gt_mask=str(mask) if mask else None,
                        defect_type=None if is_good else defect_dir.name,
                        category=cat_dir.name,
                        source=source,
                        split=sp,
                        image_size=size,
                    )
                    rec = _with_mask(rec, size, skips, with_boxes)
                    if rec is not None:
                        records.append(rec)
    return records


# --------------------------------------------------------------------------------------------- VisA


def _read_csv_rows(path: Path, skips: SkipLog) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [
                {(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)
            ]
    except Exception as exc:
        skips.add(path, f"unreadable manifest: {type(exc).__name__}: {exc}"[:300])
        return []


def read_visa(
    root: str | os.PathLike,
    category: str | None = None,
    split: str | None = None,
    csv_path: str | os.PathLike | None = None,
    skips: SkipLog | None = None,
    with_boxes: bool = True,
) -> list[Record]:
    """VisA from its split CSV (default `split_csv/1cls.csv`).

    Defect types come from each class's `image_anno.csv`.
    """
    skips = skips if skips is not None else SkipLog()
    root = Path(root)
    csv_file = Path(csv_path) if csv_path else root / "split_csv" / "1cls.csv"
    if not csv_file.is_file():
        skips.add(csv_file, "missing file: VisA split CSV not found")
        return []
    anno: dict[str, str] = {}
    for cat_dir in sorted(p for p in root.iterdir() if (p / "image_anno.csv").is_file()):
        for row in _read_csv_rows(cat_dir / "image_anno.csv", skips):
            if row.get("image"):
                anno[row["image"]] = row.get("label", "")
    records = []
    for i, row in enumerate(_read_csv_rows(csv_file, skips)):
        obj, sp, label, image = (
            row.get("object", ""),
            row.get("split", ""),
            row.get("label", ""),
            row.get("image", ""),
        )
        if category is not None and obj != category:
            continue
        if split is not None and sp != split:
            continue
        where = f"{csv_file}:{i + 2}"
        if not image:
            skips.add(where, "bad manifest row: no image")
            continue
        img = _listed_file(root, image, f"{where} {image}", "listed in the split CSV", skips)
        size = _header_size(img, skips) if img is not None else None
        if size is None:
            continue
        is_anomalous = label.lower() in ("anomaly", "anomalous", "1", "bad")
        mask_path = None
        if is_anomalous and row.get("mask"):
            m = _listed_file(
                root, row["mask"], f"{where} {row['mask']}", "mask listed in the split CSV", skips
            )
            if m is None:
                continue
            mask_path = str(m)
        defect = None
        if is_anomalous:
            desc = anno.get(image, "")
            defect = desc if desc and desc.lower() != "normal" else "anomaly"
        rec = Record(
            image_path=str(img),
            gt_label=int(is_anomalous),
            gt_mask=mask_path,
            defect_type=defect,
            category=obj,
            source="visa",
            split=sp,
            image_size=size,
        )
        rec = _with_mask(rec, size, skips, with_boxes)
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------------- DeepPCB


def _parse_box_file(path: Path, skips: SkipLog) -> list[tuple[list[float], str]] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except Exception as exc:
        skips.add(path, f"unreadable box file: {type(exc).__name__}")
        return None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
        if not parts:
            continue
        try:
            x1, y1, x2, y2, t = (int(float(p)) for p in parts[:5])
        except ValueError:
            skips.add(f"{path}:{n}", f"bad box line: {line.strip()[:60]!r}")
            continue
        out.append(
            (
                [float(min(x1, x2)), float(min(y1, y2)), float(max(x1, x2)), float(max(y1, y2))],
                DEEPPCB_TYPES.get(t, f"type{t}"),
            )
        )
    return out


def read_deeppcb(
    root: str | os.PathLike, include_templates: bool = True, skips: SkipLog | None = None
) -> list[Record]:
    """DeepPCB pairs of a defective board and its defect-free template.

    Each `_test` image (anomalous, boxes, `reference_path` = its template) and, if asked, the `_temp` template
    as a normal record. Pair members share a `group` so they never straddle splits.
    """
    skips = skips if skips is not None else SkipLog()
    root = Path(root)
    if not root.is_dir():
        skips.add(root, "missing file: dataset root not found")
        return []
    split_of: dict[str, str] = {}
    for list_file in sorted(root.rglob("*.txt")):
        if list_file.name in ("trainval.txt", "test.txt"):
            sp = "train" if list_file.name == "trainval.txt" else "test"
            for line in list_file.read_text(errors="replace").splitlines():
                if line.strip():
                    split_of[Path(line.split()[0]).stem] = sp
    records = []
    for test_img in sorted(root.rglob("*_test.jpg")):
        pid = test_img.name[: -len("_test.jpg")]
        group = f"deeppcb:{pid}"
        box_file = test_img.parent.parent / f"{test_img.parent.name}_not" / f"{pid}.txt"
        temp = test_img.with_name(f"{pid}_temp.jpg")
        size = _header_size(test_img, skips)
        if size is None:
            continue
        if not box_file.is_file():
            skips.add(box_file, "missing file: box file of a DeepPCB pair")
            continue
        parsed = _parse_box_file(box_file, skips)
        if parsed is None:
            continue
        boxes = [b for b, _ in parsed]
        types = [t for _, t in parsed]
        primary = (
            max(sorted(set(types)), key=types.count) if types else None
        )  # the most frequent type names the image
        temp_size = _header_size(temp, skips) if temp.exists() else None
        if not temp.exists():
            skips.add(temp, "missing file: template of a DeepPCB pair (test image kept without reference)")
        sp = split_of.get(pid, "")
        records.append(
            Record(
                image_path=str(test_img),
                gt_label=1 if boxes else 0,
                gt_boxes=boxes,
                defect_type=primary if boxes else None,
                category="pcb",
                source="deeppcb",
                split=sp,
                image_size=size,
                reference_path=str(temp) if temp_size else None,
                group=group,
                meta={"box_types": [t for _, t in parsed]},
            )
        )
        if include_templates and temp_size:
            records.append(
                Record(
                    image_path=str(temp),
                    gt_label=0,
                    category="pcb",
                    source="deeppcb",
                    split=sp,
                    image_size=temp_size,
                    group=group,
                )
            )
    return records


# --------------------------------------------------------------------------------------------- LLaVA JSON

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_DETECTION_Q = re.compile(r"\b(defect|anomal|abnormal|flaw|damage)", re.IGNORECASE)


def _load_json(path: Path, skips: SkipLog) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in fh if line.strip()]
            return json.load(fh)
    except Exception as exc:
        skips.add(path, f"unreadable manifest: {type(exc).__name__}: {exc}"[:300])
        return None


def _label_from_path(rel: str) -> int | None:
    parts = [p.lower() for p in re.split(r"[\\/]", rel)]
    if any(p in GOOD_NAMES for p in parts[:-1]):
        return 0
    if any(p in ("anomaly", "anomalous", "bad", "ko", "defect", "defective") for p in parts[:-1]):
        return 1
    if "test" in parts[:-1]:
        i = parts.index("test")
        if i + 2 < len(parts):  # <cat>/test/<defect>/<file>
            return 0 if parts[i + 1] in GOOD_NAMES else 1
    return None


def _defect_from_path(rel: str) -> str | None:
    parts = re.split(r"[\\/]", rel)
    for anchor in ("test", "image", "images"):
        low = [p.lower() for p in parts]
        if anchor in low[:-1]:
            i = low.index(anchor)
            if i + 2 < len(parts) and parts[i + 1].lower() not in GOOD_NAMES:
                return parts[i + 1]
    return None


def read_llava_json(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    source: str = "anomaly_instruct",
    skips: SkipLog | None = None,
    with_boxes: bool = True,
) -> list[Record]:
    """LLaVA conversation JSON (Anomaly-Instruct-125k, VisA-D&R).

    The reference dialogue is kept in `meta["conversations"]` as [{"role", "content"}] (the `<image>` tag
    removed) for reasoning evaluation.
    """
    skips = skips if skips is not None else SkipLog()
    json_path = Path(json_path)
    root = Path(image_root) if image_root else json_path.parent
    data = _load_json(json_path, skips)
    if data is None:
        return []
    if isinstance(data, dict):
        data = data.get("data") or data.get("annotations") or list(data.values())
    records = []
    for i, item in enumerate(data):
        where = f"{json_path}[{i}]"
        if not isinstance(item, dict):
            skips.add(where, "bad manifest row: not an object")
            continue
        image = item.get("image")
        if isinstance(image, list):
            image = image[0] if image else None
        if not isinstance(image, str) or not image:
            skips.add(where, "bad manifest row: no image (text-only sample)")
            continue
        img = _listed_file(root, image, f"{where} {image}", "listed in the JSON", skips)
        size = _header_size(img, skips) if img is not None else None
        if size is None:
            continue
        meta_in = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
        turns = []
        for t in item.get("conversations") or []:
            if isinstance(t, dict):
                role = _ROLE.get(str(t.get("from", t.get("role", ""))).lower(), "user")
                text = str(t.get("value", t.get("content", ""))).replace("<image>", "").strip()
                extra = {k: v for k, v in t.items() if k not in ("from", "value", "role", "content")}
                turns.append({"role": role, "content": text, **extra})  # keep per-turn tags (e.g. "type")
        label = _json_label(meta_in, turns, image)
        if label is None:
            skips.add(img, "unlabelled: no metadata.anomaly, detection answer or good/defect folder")
            continue
        defect = None
        if label:
            defect = next(
                (str(meta_in[k]) for k in ("defect_type", "defect", "anomaly_type") if meta_in.get(k)), None
            )
            defect = defect or _defect_from_path(image) or "anomaly"
        category = next((str(meta_in[k]) for k in ("class", "object", "class_name") if meta_in.get(k)), "")
        if not category:
            category = re.split(r"[\\/]", image)[0] if "/" in image else ""
        mask_path = None
        mask_rel = meta_in.get("mask") or item.get("mask")
        if label and isinstance(mask_rel, str) and mask_rel:
            m = _listed_file(root, mask_rel, f"{where} {mask_rel}", "mask listed in the JSON", skips)
            if m is None:
                continue
            mask_path = str(m)
        rec = Record(
            image_path=str(img),
            gt_label=label,
            gt_mask=mask_path,
            defect_type=defect,
            category=category,
            source=source,
            split="test" if source == "visa_dr" else "train",
            image_size=size,
            meta={"id": item.get("id", str(i)), "conversations": turns, "domain": meta_in.get("category")},
        )
        rec = _with_mask(rec, size, skips, with_boxes)
        if rec is not None:
            records.append(rec)
    return records


def _json_label(meta: dict[str, Any], turns: list[dict[str, str]], image: str) -> int | None:
    for key in ("anomaly", "is_anomaly", "anomalous", "label", "gt_label"):
        if key in meta:
            value = meta[key]
            if isinstance(value, str):
                value = _parse_label(value) == 1
            return int(bool(value))
    for q, a in zip(turns, turns[1:]):
        if q["role"] == "user" and a["role"] == "assistant" and _DETECTION_Q.search(q["content"]):
            verdict = read_verdict(a["content"])
            if verdict is not None:
                return int(verdict == "anomalous")
    return _label_from_path(image)


def read_visa_dr(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, skips: SkipLog | None = None
) -> list[Record]:
    """VisA-D&R (reasoning evaluation): LLaVA JSON; records are split "test"."""
    return read_llava_json(json_path, image_root, source="visa_dr", skips=skips)


def read_anomaly_instruct(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, skips: SkipLog | None = None
) -> list[Record]:
    """Anomaly-Instruct-125k (training conversations): LLaVA JSON; records are split "train"."""
    return read_llava_json(json_path, image_root, source="anomaly_instruct", skips=skips)


# --------------------------------------------------------------------------------------------- MMAD


def read_mmad(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    skips: SkipLog | None = None,
    with_boxes: bool = False,
) -> list[Record]:
    """MMAD: `meta["questions"]` holds the multiple-choice items ({Question, Answer, Options, type}).

    `meta["key"]` is the image's key in the JSON (MMAD's scorer reads dataset and "good" from it);
    `meta["random_templates"]` / `meta["similar_templates"]` are MMAD's normal references, `reference_path`
    the first similar one. MMAD's masks are colour renderings (`rbg_mask`), so boxes are not derived unless
    asked.
    """
    skips = skips if skips is not None else SkipLog()
    json_path = Path(json_path)
    root = Path(image_root) if image_root else json_path.parent
    data = _load_json(json_path, skips)
    if not isinstance(data, dict):
        if data is not None:
            skips.add(json_path, "bad manifest: MMAD JSON is an object keyed by image path")
        return []
    records = []
    for key, item in data.items():
        if not isinstance(item, dict):
            skips.add(f"{json_path}[{key}]", "bad manifest row: not an object")
            continue
        rel = item.get("image_path") or key
        img = _listed_file(root, rel, f"{json_path}[{key}]", "listed in the MMAD JSON", skips)
        size = _header_size(img, skips) if img is not None else None
        if size is None:
            continue
        questions = [q for q in item.get("conversation") or [] if isinstance(q, dict)]
        label = _label_from_path(rel)
        for q in questions:
            if str(q.get("type", "")).lower().startswith("anomaly detection"):
                verdict = read_verdict(str((q.get("Options") or {}).get(q.get("Answer"), "")))
                label = label if verdict is None else int(verdict == "anomalous")
        if label is None:
            skips.add(img, "unlabelled: no good/defect folder or detection answer")
            continue
        parts = re.split(r"[\\/]", rel)
        category = parts[1] if len(parts) > 3 else (parts[0] if len(parts) > 1 else "")
        templates = {}
        for kind in ("random_templates", "similar_templates"):
            listed = [resolve_inside(root, t) if isinstance(t, str) else None for t in item.get(kind) or []]
            templates[kind] = [str(p) for p in listed if p is not None and p.is_file()]
        similar = templates["similar_templates"]
        mask_path = None
        if label and isinstance(item.get("mask_path"), str):
            m = resolve_inside(root, item["mask_path"])
            if m is not None and m.is_file():
                mask_path = str(m)
            else:
                skips.add(
                    item["mask_path"], "missing file: mask listed in the MMAD JSON (record kept without mask)"
                )
        rec = Record(
            image_path=str(img),
            gt_label=label,
            gt_mask=mask_path,
            defect_type=(_defect_from_path(rel) or "anomaly") if label else None,
            category=category,
            source="mmad",
            split="test",
            image_size=size,
            reference_path=similar[0] if similar else None,
            meta={"questions": questions, **templates, "key": str(key), "dataset": parts[0] if parts else ""},
        )
        rec = _with_mask(rec, size, skips, with_boxes) if with_boxes else rec
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------------- generic


def _parse_label(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(float(value) >= 0.5)
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return int(text == "true")
    verdict = verdict_word(text)
    if verdict is not None:
        return int(verdict == "anomalous")
    try:
        return int(float(text) >= 0.5)  # a defect probability (e.g. ELPV's 0 / 0.33 / 0.67 / 1)
    except ValueError:
        return None


def _parse_boxes(value: Any) -> list[list[float]]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            value = json.loads(value)
        else:  # "x1 y1 x2 y2; x1 y1 x2 y2"
            value = [
                [float(v) for v in re.split(r"[,\s]+", part.strip()) if v]
                for part in value.split(";")
                if part.strip()
            ]
    if value and isinstance(value[0], (int, float)):
        value = [value]
    boxes = []
    for b in value:
        if len(b) != 4:
            raise ValueError(f"a box has 4 numbers, got {b!r}")
        boxes.append([float(v) for v in b])
    return boxes


def read_manifest(
    manifest: str | os.PathLike,
    root: str | os.PathLike | None = None,
    skips: SkipLog | None = None,
    source: str = "custom",
    with_boxes: bool = True,
) -> list[Record]:
    """A user's CSV or JSONL manifest.

    Columns: image (or image_path), label (or gt_label / defect_probability), optional mask, boxes (JSON or
    "x1 y1 x2 y2;…"), defect_type, category, split, reference. Paths are relative to `root` (default: the
    manifest's folder) and must stay inside it.
    """
    skips = skips if skips is not None else SkipLog()
    manifest = Path(manifest)
    root = Path(root) if root else manifest.parent
    if manifest.suffix.lower() in (".jsonl", ".json"):
        rows = _load_json(manifest, skips) or []
        rows = rows if isinstance(rows, list) else []
    else:
        rows = _read_csv_rows(manifest, skips)
    records = []
    for i, row in enumerate(rows):
        where = f"{manifest}:{i + 2 if manifest.suffix.lower() == '.csv' else i + 1}"
        if not isinstance(row, dict):
            skips.add(where, "bad manifest row: not an object")
            continue
        image = row.get("image") or row.get("image_path")
        if not image:
            skips.add(where, "bad manifest row: no image")
            continue
        img = _listed_file(root, str(image), f"{where} {image}", "listed in the manifest", skips)
        if img is None:
            continue
        raw_label = next(
            (row[k] for k in ("label", "gt_label", "defect_probability") if row.get(k) not in (None, "")),
            None,
        )
        label = _parse_label(raw_label) if raw_label is not None else None
        if label is None:
            skips.add(where, f"bad manifest row: unknown label {raw_label!r}")
            continue
        try:
            boxes = _parse_boxes(row.get("boxes") or row.get("gt_boxes"))
        except (ValueError, TypeError) as exc:
            skips.add(where, f"bad manifest row: boxes: {exc}"[:200])
            continue
        size = _header_size(img, skips)
        if size is None:
            continue
        mask_path = None
        mask_rel = row.get("mask") or row.get("gt_mask")
        if mask_rel:
            m = _listed_file(root, str(mask_rel), f"{where} {mask_rel}", "mask listed in the manifest", skips)
            if m is None:
                continue
            mask_path = str(m)
        ref = None
        if row.get("reference") or row.get("reference_path"):
            ref_rel = str(row.get("reference") or row.get("reference_path"))
            r = resolve_inside(root, ref_rel)
            if r is None or not r.is_file():
                skips.add(
                    f"{where} {ref_rel}",
                    "path escapes dataset root" if r is None else "missing file: reference",
                )
                continue
            ref = str(r)
        defect = (row.get("defect_type") or None) if label else None
        rec = Record(
            image_path=str(img),
            gt_label=label,
            gt_mask=mask_path,
            gt_boxes=boxes if label else [],
            defect_type=(defect or "anomaly") if label else None,
            category=str(row.get("category") or root.name),
            source=source,
            split=str(row.get("split") or ""),
            reference_path=ref,
            image_size=size,
            meta={"label_raw": raw_label} if str(raw_label).strip().lower() not in ("0", "1") else {},
        )
        rec = _with_mask(rec, size, skips, with_boxes)
        if rec is not None:
            records.append(rec)
    return records


def read_folder(
    root: str | os.PathLike, skips: SkipLog | None = None, source: str = "custom", with_boxes: bool = True
) -> list[Record]:
    """A user's folder of images sorted into `good` and per-defect subfolders.

    `<root>/[<category>/]good/*` normal, `<root>/[<category>/]<defect>/*` anomalous, masks optionally in
    `<same parent>/masks/<defect>/<stem>[_mask].png`. A manifest (`manifest.csv|jsonl`, `labels.csv`) at the
    root takes precedence; an MVTec-layout root is read as MVTec.
    """
    skips = skips if skips is not None else SkipLog()
    root = Path(root)
    if not root.is_dir():
        skips.add(root, "missing file: folder not found")
        return []
    for name in ("manifest.csv", "manifest.jsonl", "labels.csv"):
        if (root / name).is_file():
            return read_manifest(root / name, root, skips, source, with_boxes)
    if _mvtec_categories(root):
        return read_mvtec(root, skips=skips, source=source, with_boxes=with_boxes)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("masks", "ground_truth"))
    has_labels = any(p.name.lower() in GOOD_NAMES for p in subdirs)
    groups = [(root, "")] if has_labels else [(p, p.name) for p in subdirs]
    records = []
    for base, category in groups:
        for defect_dir in sorted(
            p for p in base.iterdir() if p.is_dir() and p.name not in ("masks", "ground_truth")
        ):
            is_good = defect_dir.name.lower() in GOOD_NAMES
            for img in _sorted_images(defect_dir):
                size = _header_size(img, skips)
                if size is None:
                    continue
                mask = None
                if not is_good:
                    for mdir in (base / "masks" / defect_dir.name, base / "ground_truth" / defect_dir.name):
                        mask = _find_mask(mdir, img.stem) if mdir.is_dir() else None
                        if mask:
                            break
                rec = Record(
                    image_path=str(img),
                    gt_label=0 if is_good else 1,
                    gt_mask=str(mask) if mask else None,
                    defect_type=None if is_good else defect_dir.name,
                    category=category or root.name,
                    source=source,
                    image_size=size,
                )
                rec = _with_mask(rec, size, skips, with_boxes)
                if rec is not None:
                    records.append(rec)
    return records


# --------------------------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[..., list[Record]]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "deeppcb": read_deeppcb,
    "folder": read_folder,
    "manifest": read_manifest,
    "anomaly_instruct": read_anomaly_instruct,
    "visa_dr": read_visa_dr,
    "mmad": read_mmad,
}


def detect_kind(path: str | os.PathLike) -> str:
    """Guess a reader from what is at `path` (used by `anomaly-assistant data build --source PATH`)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in (".csv", ".jsonl"):
            return "manifest"
        if p.suffix.lower() == ".json":
            try:
                with open(p, encoding="utf-8") as fh:
                    head = fh.read(4096).lstrip()
            except OSError:
                return "anomaly_instruct"
            return "mmad" if head.startswith("{") else "anomaly_instruct"
        raise ValueError(f"cannot tell the format of {p}")
    if (p / "split_csv").is_dir():
        return "visa"
    if (
        p.is_dir()
        and next(p.rglob("*_test.jpg"), None) is not None
        and next(p.rglob("*_not"), None) is not None
    ):
        return "deeppcb"
    if p.is_dir() and _mvtec_categories(p):
        return "mvtec"
    return "folder"


def read_source(spec: str, skips: SkipLog | None = None) -> list[Record]:
    """Read `KIND:PATH[:IMAGE_ROOT]` or a bare `PATH` (kind detected). KIND is one of `READERS`."""
    skips = skips if skips is not None else SkipLog()
    kind, _, rest = spec.partition(":")
    if kind not in READERS or not rest:
        kind, rest = detect_kind(spec), spec
    path, _, extra = (
        rest.partition(":") if kind in ("anomaly_instruct", "visa_dr", "mmad", "manifest") else (rest, "", "")
    )
    reader = READERS[kind]
    if kind in ("anomaly_instruct", "visa_dr", "mmad"):
        return reader(path, extra or None, skips=skips)
    if kind == "manifest":
        return reader(path, extra or None, skips=skips)
    if kind in ("mvtec", "folder"):  # name the source after its folder (mpdd, btad, magnetic_tile, …)
        return reader(path, skips=skips, source=Path(path).resolve().name.lower() or kind)
    return reader(path, skips=skips)
