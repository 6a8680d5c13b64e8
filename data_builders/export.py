"""Exports to HF `datasets` in the formats TRL's trainers read, leak-free splits and a dataset card.

- SFT (`SFTTrainer`): `images` (list of one image) + `messages` ([{"role", "content": str}], the image goes to
  the first user turn; TRL inserts the placeholder), or `prompt` / `completion` (completion-only loss).
- GRPO (`GRPOTrainer`): `image` + `prompt` + the solution columns the rewards read as keyword arguments:
  `verdict`, `gt_label`, `defect_type` (canonical words), `solution_boxes` (input frame), `gt_boxes`
  (original pixels), `frame` (JSON of the `Frame`, for `parse_answer(text, Frame.from_json(...))`), `answer`
  (the target).
- Expert (stage 1): `image`, `gt_label`, `mask` (None for normal images), `gt_boxes`, `category`,
  `defect_type`.
Images are embedded as bytes so a saved dataset is self-contained (`embed=False`: absolute paths only, for
large builds where each image would otherwise be stored once per conversation kind). Splits are drawn per
`Record.group` (the physical source image), so a synthesised defect never lands in another split than its
normal original.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_assistant.data_builders.conversations import Sample
from anomaly_assistant.data_builders.records import Record, SkipLog, load_mask, summarize
from anomaly_assistant.prompts import INSPECTION_PROMPT

SPLITS = ("train", "validation", "test")


def split_records(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    keep_existing: bool = False,
) -> dict[str, list[Record]]:
    """Assign train/validation/test by group, so no source image straddles two splits.

    Groups are ordered by a seeded hash (independent of input order) and cut by `fractions`. `keep_existing`
    keeps a record's own `split` when it is one of the three names.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three numbers summing to 1, got {fractions}")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    free: list[Record] = []
    for rec in records:
        if keep_existing and rec.split in SPLITS:
            out[rec.split].append(rec)
        else:
            free.append(rec)
    groups = sorted({r.group for r in free}, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    n = len(groups)
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    if n >= 3:  # every split gets at least one group when there are enough
        n_val = max(1, n_val)
        n_train = min(n_train, n - n_val - (1 if fractions[2] > 0 else 0))
    where = {
        g: ("train" if i < n_train else "validation" if i < n_train + n_val else "test")
        for i, g in enumerate(groups)
    }
    for rec in free:
        rec.split = where[rec.group]
        out[rec.split].append(rec)
    return out


def _image_value(path: str, embed: bool = True) -> dict[str, Any]:
    """An `Image` feature value: the file's bytes (self-contained dataset) or only its absolute path."""
    if not embed:
        return {"bytes": None, "path": str(Path(path).resolve())}
    with open(path, "rb") as fh:
        return {"bytes": fh.read(), "path": Path(path).name}


def _mask_value(mask_path: str | None, embed: bool = True) -> dict[str, Any] | None:
    """A mask as a 0/255 PNG; a folder of masks (MVTec LOCO) becomes their union, always embedded."""
    if not mask_path:
        return None
    if Path(mask_path).is_file():
        return _image_value(mask_path, embed)
    mask, _ = load_mask(mask_path)
    if mask is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": Path(mask_path).name + ".png"}


def sft_row(sample: Sample, fmt: str = "messages", embed: bool = True) -> dict[str, Any]:
    """One SFT row in the column layout TRL's `SFTTrainer` reads (`messages` or `prompt` / `completion`)."""
    rec = sample.record
    base = {
        "images": [_image_value(rec.image_path, embed)],
        "kind": sample.kind,
        "category": rec.category,
        "gt_label": rec.gt_label,
        "source": rec.source,
    }
    if fmt == "messages":
        return base | {"messages": sample.messages}
    if fmt == "prompt_completion":
        return base | {"prompt": sample.messages[:-1], "completion": sample.messages[-1:]}
    raise ValueError(f"unknown SFT format {fmt!r}: messages or prompt_completion")


def grpo_row(sample: Sample, embed: bool = True) -> dict[str, Any]:
    """One GRPO row: the product's prompt plus the solution columns the rewards read as keyword arguments."""
    rec = sample.record
    return {
        "image": _image_value(rec.image_path, embed),
        "prompt": [{"role": "user", "content": INSPECTION_PROMPT}],  # exactly what the assistant asks
        "verdict": "anomalous" if rec.gt_label else "normal",
        "gt_label": rec.gt_label,
        "defect_type": sample.defect_type,
        "solution_boxes": [list(map(float, b)) for b in sample.boxes_input],
        "gt_boxes": [list(map(float, b)) for b in rec.gt_boxes],
        "frame": json.dumps(sample.frame.to_json()),
        "answer": sample.answer,
        "category": rec.category,
        "source": rec.source,
    }


def expert_row(rec: Record, embed: bool = True) -> dict[str, Any]:
    """One row for stage-1 expert training: image, mask and labels, no conversation."""
    return {
        "image": _image_value(rec.image_path, embed),
        "mask": _mask_value(rec.gt_mask, embed),
        "gt_label": rec.gt_label,
        "gt_boxes": [list(map(float, b)) for b in rec.gt_boxes],
        "category": rec.category,
        "defect_type": rec.defect_type,
        "source": rec.source,
        "image_path": rec.image_path,
        "reference_path": rec.reference_path,
    }


def _features(kind: str, fmt: str = "messages"):
    import datasets as ds

    msg = ds.List({"role": ds.Value("string"), "content": ds.Value("string")})
    boxes = ds.List(ds.List(ds.Value("float32")))
    common = {"category": ds.Value("string"), "source": ds.Value("string"), "gt_label": ds.Value("int64")}
    if kind == "sft":
        conv = {"messages": msg} if fmt == "messages" else {"prompt": msg, "completion": msg}
        return ds.Features({"images": ds.List(ds.Image()), **conv, "kind": ds.Value("string"), **common})
    if kind == "grpo":
        return ds.Features(
            {
                "image": ds.Image(),
                "prompt": msg,
                "verdict": ds.Value("string"),
                "defect_type": ds.Value("string"),
                "solution_boxes": boxes,
                "gt_boxes": boxes,
                "frame": ds.Value("string"),
                "answer": ds.Value("string"),
                **common,
            }
        )
    if kind == "expert":
        return ds.Features(
            {
                "image": ds.Image(),
                "mask": ds.Image(),
                "gt_boxes": boxes,
                "defect_type": ds.Value("string"),
                "image_path": ds.Value("string"),
                "reference_path": ds.Value("string"),
                **common,
            }
        )
    raise ValueError(kind)


def to_dataset(
    rows: Iterable[dict[str, Any]], kind: str, fmt: str = "messages", scratch: str | Path | None = None
):
    """Rows from `sft_row` / `grpo_row` / `expert_row` -> `datasets.Dataset` with explicit features.

    With `scratch` (an .arrow path) rows stream to disk one batch at a time and the result is memory-mapped,
    so memory stays flat however many images a build embeds; without it the rows are collected in memory.
    """
    import datasets as ds

    features = _features(kind, fmt)
    if scratch is not None:
        from datasets.arrow_writer import ArrowWriter

        Path(scratch).parent.mkdir(parents=True, exist_ok=True)
        writer = ArrowWriter(features=features, path=str(scratch), writer_batch_size=64)
        for row in rows:
            writer.write(features.encode_example(row))
        writer.finalize()
        writer.close()
        return ds.Dataset.from_file(str(scratch))
    rows = list(rows)
    if not rows:
        return ds.Dataset.from_dict({k: [] for k in features}, features=features)
    return ds.Dataset.from_list(rows, features=features)


def sft_dataset(
    samples: Iterable[Sample], fmt: str = "messages", embed: bool = True, scratch: str | Path | None = None
):
    """The SFT dataset of `samples`, every conversation kind a row of its own."""
    return to_dataset((sft_row(s, fmt, embed) for s in samples), "sft", fmt, scratch)


def grpo_dataset(samples: Iterable[Sample], embed: bool = True, scratch: str | Path | None = None):
    """One row per record (its first sample), since GRPO samples its own answers to the one prompt.

    The prompt is the product's inspection prompt, the solution columns come from the record, so every kind of
    sample carries them.
    """

    def rows():
        seen: set[int] = set()
        for s in samples:
            if id(s.record) not in seen:
                seen.add(id(s.record))
                yield grpo_row(s, embed)

    return to_dataset(rows(), "grpo", scratch=scratch)


def expert_dataset(records: Iterable[Record], embed: bool = True, scratch: str | Path | None = None):
    """The stage-1 expert dataset: one row per record, conversations play no part."""
    return to_dataset((expert_row(r, embed) for r in records), "expert", scratch=scratch)


def dataset_card(
    splits: dict[str, list[Record]],
    samples_per_split: dict[str, Counter] | None = None,
    skips: SkipLog | None = None,
    title: str = "anomaly-assistant data build",
    notes: Sequence[str] = (),
) -> str:
    """A Markdown dataset card: counts per split × category / defect type / label, sources, skipped input."""
    lines = [f"# {title}", ""]
    lines += [
        "Built by `anomaly-assistant data build`. Splits never share a source image (split by group).",
        "",
    ]
    lines += ["## Images per split", "", "| split | images | normal | anomalous |", "|---|---:|---:|---:|"]
    for sp, recs in splits.items():
        n1 = sum(r.gt_label for r in recs)
        lines.append(f"| {sp} | {len(recs)} | {len(recs) - n1} | {n1} |")
    for field_name, heading in (
        ("category", "Category"),
        ("defect_type", "Defect type"),
        ("source", "Source"),
    ):
        keys = sorted({k for recs in splits.values() for k in summarize(recs)[field_name]}, key=str)
        lines += [
            "",
            f"## {heading}",
            "",
            "| " + heading.lower() + " | " + " | ".join(splits) + " |",
            "|---|" + "---:|" * len(splits),
        ]
        per = {sp: summarize(recs)[field_name] for sp, recs in splits.items()}
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(str(per[sp].get(k, 0)) for sp in splits) + " |")
    if samples_per_split:
        kinds = sorted({k for c in samples_per_split.values() for k in c})
        lines += [
            "",
            "## Conversation samples",
            "",
            "| kind | " + " | ".join(samples_per_split) + " |",
            "|---|" + "---:|" * len(samples_per_split),
        ]
        for k in kinds:
            lines.append(
                f"| {k} | " + " | ".join(str(c.get(k, 0)) for c in samples_per_split.values()) + " |"
            )
    if skips is not None:
        lines += ["", "## Skipped input", "", "```", skips.format(limit=50), "```"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_records_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Save records as JSON lines, so a build's splits can be read back and audited without `datasets`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec.to_dict(), ensure_ascii=False, default=str) + "\n" for rec in records)


def read_records_jsonl(path: str | Path) -> list[Record]:
    """Read back what `write_records_jsonl` saved (blank lines are skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [Record.from_dict(json.loads(line)) for line in fh if line.strip()]
