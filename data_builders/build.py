"""The data build: sources in, conversations and SFT / GRPO / expert datasets with a dataset card out.

It reads the sources, checks them, adds synthetic data, splits by source image and writes the conversations
and datasets. `anomaly-assistant data build` is a thin wrapper.

Output folder:
  images/            synthesised images and masks (SynthInspect in MVTec layout, defects on normal images,
                     textures)
  records/<split>.jsonl   the records (one field vocabulary)
  sft/ grpo/ expert/ `datasets.DatasetDict` (save_to_disk), one split each of train / validation / test
  anomaly_instruct.json   the conversations in LLaVA JSON (Anomaly-Instruct style)
  README.md          dataset card;  summary.json  counts, skipped input, timings
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_assistant.backbones import FAMILIES, input_frame
from anomaly_assistant.data_builders import conversations, export
from anomaly_assistant.data_builders.defects import foreground, skimage_texture_paths, synthesize
from anomaly_assistant.data_builders.records import Record, SkipLog, summarize, validate_records
from anomaly_assistant.data_builders.sources import read_source
from anomaly_assistant.data_builders.synth_inspect import CATEGORIES, SynthConfig, SynthInspect


@dataclass
class BuildConfig:
    """What `anomaly-assistant data build` makes (YAML keys = these field names)."""

    sources: list[str] = field(
        default_factory=list,
        metadata={"help": "KIND:PATH[:IMAGE_ROOT] or PATH (kind detected)", "aliases": ["--source"]},
    )
    out: str = field(default="runs/data", metadata={"help": "output folder"})
    synth: int = field(default=0, metadata={"help": "number of SynthInspect images (half anomalous)"})
    synth_size: int = field(default=256, metadata={"help": "SynthInspect image side in pixels"})
    synth_categories: list[str] = field(
        default_factory=lambda: list(CATEGORIES),
        metadata={"help": "SynthInspect categories", "aliases": ["--synth-category"]},
    )
    defects: int = field(default=0, metadata={"help": "defects synthesised on normal images of the sources"})
    textures: int = field(
        default=0, metadata={"help": "crops of scikit-image's CC0 textures (half given defects)"}
    )
    backbone: str = field(
        default="qwen2_5_vl", metadata={"help": "box frame of the targets", "choices": list(FAMILIES)}
    )
    processor: str = field(
        default="",
        metadata={
            "help": "checkpoint folder or hub id whose processor sets the box "
            "frame (default: the real checkpoint's resize settings)"
        },
    )
    kinds: list[str] = field(
        default_factory=lambda: list(conversations.SAMPLE_KINDS),
        metadata={"help": "conversation kinds per image", "aliases": ["--kind"]},
    )
    sft_format: str = field(
        default="messages", metadata={"help": "SFT columns", "choices": ("messages", "prompt_completion")}
    )
    fractions: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "train/val/test"}
    )
    embed_images: bool = field(
        default=True,
        metadata={
            "help": "store image bytes in the datasets (self-contained); --no-embed-images keeps paths only"
        },
    )
    keep_splits: bool = field(default=False, metadata={"help": "keep the sources' own train/test splits"})
    seed: int = field(default=0, metadata={"help": "random seed (everything is deterministic given it)"})
    teacher: bool = field(
        default=False, metadata={"help": "rewrite texts with the ANOMALY_TEACHER_* endpoint"}
    )
    max_images: int = field(default=0, metadata={"help": "cap on source images (0 = all)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass
class BuildResult:
    """What a build produced, kept in memory so the CLI and tests can report on it without rereading disk."""

    splits: dict[str, list[Record]]
    samples: dict[str, list[conversations.Sample]]
    skips: SkipLog
    timings: dict[str, float]
    out: Path

    def summary_table(self) -> str:
        rows = [("split", "images", "normal", "anomalous", "samples")]
        for sp, recs in self.splits.items():
            n1 = sum(r.gt_label for r in recs)
            rows.append(
                (sp, str(len(recs)), str(len(recs) - n1), str(n1), str(len(self.samples.get(sp, []))))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        cats = Counter()
        for recs in self.splits.values():
            cats.update(summarize(recs)["defect_type"])
        lines += ["", "defect types: " + ", ".join(f"{k} {v}" for k, v in cats.most_common())]
        lines += ["", self.skips.format(limit=10)]
        return "\n".join(lines)


def _tqdm(progress: bool):
    from tqdm.auto import tqdm

    return lambda it=None, **kw: tqdm(it, disable=not progress, **kw)


def synth_defect_records(
    normals: list[Record],
    n: int,
    out_dir: Path,
    rng: np.random.Generator,
    skips: SkipLog,
    progress: bool = False,
) -> list[Record]:
    """`n` defects synthesised on randomly chosen normal records.

    Each new record keeps its original's group, so a defect and its source image never straddle two splits.
    """
    if not normals or n <= 0:
        return []
    bar = _tqdm(progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    picks = rng.integers(len(normals), size=n)
    for i in bar(range(n), desc="defects", unit="img"):
        src = normals[int(picks[i])]
        try:
            with Image.open(src.image_path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as exc:  # validated before, but a file can change under us
            skips.add(src.image_path, f"unreadable image: {type(exc).__name__}")
            continue
        d = synthesize(img, rng=rng, region=foreground(img))
        ipath, mpath = out_dir / f"{i:06d}.png", out_dir / f"{i:06d}_mask.png"
        Image.fromarray(d.image).save(ipath, compress_level=1)
        Image.fromarray(d.mask.astype(np.uint8) * 255).save(mpath, compress_level=1)
        made.append(
            Record(
                str(ipath),
                1,
                str(mpath),
                d.boxes,
                d.defect_type,
                src.category,
                f"{src.source}+defects",
                image_size=(img.shape[1], img.shape[0]),
                group=src.group,
                meta={"original": src.image_path, "kind": d.kind},
            )
        )
    return made


def texture_records(
    n: int, out_dir: Path, rng: np.random.Generator, size: int = 256, progress: bool = False
) -> list[Record]:
    """Random crops of scikit-image's CC0 texture photos, half of them with a synthesised defect.

    All crops of one photo share a group (they overlap), so one photo never straddles two splits.
    """
    paths = skimage_texture_paths()
    if not paths or n <= 0:
        return []
    photos = {p: np.asarray(Image.open(p).convert("RGB")) for p in paths}
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = _tqdm(progress)
    made = []
    for i in bar(range(n), desc="textures", unit="img"):
        p = paths[int(rng.integers(len(paths)))]
        photo = photos[p]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 0.8))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.asarray(
            Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        )
        ipath = out_dir / f"{p.stem}_{i:06d}.png"
        category = p.stem
        if rng.random() < 0.5:
            Image.fromarray(crop).save(ipath, compress_level=1)
            made.append(
                Record(
                    str(ipath),
                    0,
                    category=category,
                    source="skimage_textures",
                    image_size=(size, size),
                    group=f"skimage:{p.stem}",
                )
            )
            continue
        d = synthesize(crop, rng=rng)
        mpath = out_dir / f"{p.stem}_{i:06d}_mask.png"
        Image.fromarray(d.image).save(ipath, compress_level=1)
        Image.fromarray(d.mask.astype(np.uint8) * 255).save(mpath, compress_level=1)
        made.append(
            Record(
                str(ipath),
                1,
                str(mpath),
                d.boxes,
                d.defect_type,
                category,
                "skimage_textures",
                image_size=(size, size),
                group=f"skimage:{p.stem}",
                meta={"kind": d.kind},
            )
        )
    return made


def build(cfg: BuildConfig) -> BuildResult:
    """Run the whole build (see the module docstring). Never raises on bad input files: they are logged."""
    if cfg.backbone not in FAMILIES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(FAMILIES)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    skips = SkipLog()
    timings: dict[str, float] = {}
    bar = _tqdm(cfg.progress)
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()

    t0 = time.perf_counter()
    records: list[Record] = []
    for spec in cfg.sources:
        try:
            records += read_source(spec, skips)
        except (ValueError, OSError) as exc:
            skips.add(spec, f"unreadable source: {exc}"[:300])
    if cfg.max_images and len(records) > cfg.max_images:
        keep = sorted(rng.choice(len(records), cfg.max_images, replace=False).tolist())
        records = [records[i] for i in keep]
    records = validate_records(bar(records, desc="checking", unit="img"), skips)
    timings["read_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.synth > 0:
        cats = tuple(cfg.synth_categories)
        gen = SynthInspect(SynthConfig(size=cfg.synth_size, categories=cats, seed=cfg.seed))
        records += gen.write_mvtec(
            out / "images" / "synth_inspect", n_train=0, n_test=0, total=cfg.synth, progress=cfg.progress
        )
    normals = [r for r in records if r.gt_label == 0 and r.source != "synth_inspect"]
    records += synth_defect_records(
        normals, cfg.defects, out / "images" / "defects", rng, skips, cfg.progress
    )
    records += texture_records(cfg.textures, out / "images" / "textures", rng, progress=cfg.progress)
    timings["synthesis_s"] = time.perf_counter() - t0
    prefix = str(out) + "/"
    for rec in records:  # generated images: groups relative to the output, so splits do not depend on --out
        if rec.group.startswith(prefix):
            rec.group = rec.group[len(prefix) :]

    splits = export.split_records(records, cfg.fractions, cfg.seed, keep_existing=cfg.keep_splits)

    t0 = time.perf_counter()
    rewrite = None
    if cfg.teacher:
        from anomaly_assistant.data_builders.teacher import Teacher

        rewrite = Teacher.from_env(cache_dir=out / ".teacher_cache")
        if rewrite is None:
            print(
                "teacher requested but ANOMALY_TEACHER_BASE_URL is not set: templated texts kept",
                file=sys.stderr,
            )
    processor = None
    if cfg.processor:
        from transformers import AutoProcessor

        from anomaly_assistant import backbones

        backbones.get(cfg.backbone)  # registers the image-only processor classes with AutoProcessor
        processor = AutoProcessor.from_pretrained(cfg.processor)
    frames: dict[tuple[int, int], object] = {}
    samples: dict[str, list[conversations.Sample]] = {}
    for sp, recs in splits.items():
        samples[sp] = []
        for i, rec in enumerate(bar(recs, desc=f"conversations {sp}", unit="img")):
            size = tuple(rec.image_size)
            if size not in frames:
                frames[size] = input_frame(cfg.backbone, size, processor)
            srng = np.random.default_rng([cfg.seed, hash_group(rec.group), i])  # order- and --out-independent
            samples[sp] += conversations.build_samples(rec, frames[size], srng, cfg.kinds, rewrite=rewrite)
    timings["conversations_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    import shutil

    import datasets as ds

    emb, scratch = cfg.embed_images, out / ".scratch"
    makers = {
        "sft": lambda sp: export.sft_dataset(samples[sp], cfg.sft_format, emb, scratch / f"sft-{sp}.arrow"),
        "grpo": lambda sp: export.grpo_dataset(samples[sp], emb, scratch / f"grpo-{sp}.arrow"),
        "expert": lambda sp: export.expert_dataset(splits[sp], emb, scratch / f"expert-{sp}.arrow"),
    }
    for name, make in makers.items():  # one dataset at a time: rows stream through a scratch file
        ds.DatasetDict({sp: make(sp) for sp in splits}).save_to_disk(str(out / name))
    shutil.rmtree(scratch, ignore_errors=True)
    for sp, recs in splits.items():
        export.write_records_jsonl(recs, out / "records" / f"{sp}.jsonl")
    llava = [conversations.to_llava(s) for sp in samples for s in samples[sp]]
    (out / "anomaly_instruct.json").write_text(json.dumps(llava, ensure_ascii=False))
    timings["export_s"] = time.perf_counter() - t0

    kinds_per_split = {sp: Counter(s.kind for s in ss) for sp, ss in samples.items()}
    notes = [
        f"boxes in the answer targets and `solution_boxes` are in the {cfg.backbone} input frame; "
        "`gt_boxes` are original pixels",
        f"seed {cfg.seed}",
    ]
    notes += [f"source: `{spec}`" for spec in cfg.sources]
    if any(
        "real-dev" in r.image_path or r.source.startswith(("magnetic", "deeppcb", "elpv"))
        for recs in splits.values()
        for r in recs
    ):
        notes.append(
            "contains real development images (magnetic tiles, DeepPCB, ELPV): keep their attribution and "
            "licences (ELPV is non-commercial); do not train a released default model on them"
        )
    (out / "README.md").write_text(export.dataset_card(splits, kinds_per_split, skips, notes=notes))
    result = BuildResult(splits, samples, skips, timings, out)
    summary = {
        "config": asdict(cfg),
        "timings": timings,
        "splits": {
            sp: {"images": len(r), "anomalous": sum(x.gt_label for x in r), "samples": len(samples[sp])}
            for sp, r in splits.items()
        },
        "skipped": [{"path": p, "reason": why} for p, why in skips.items],
        "skipped_counts": dict(skips.reasons()),
    }
    if cfg.teacher:
        summary["teacher"] = (
            rewrite.stats if rewrite is not None else "not configured (ANOMALY_TEACHER_BASE_URL unset)"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return result


def hash_group(group: str) -> int:
    """A stable 32-bit integer for a group name (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(group.encode())
