"""`anomaly-assistant data {build,inspect,synth}`: thin wrappers over `build.build`, readers, SynthInspect.

Each sub-command has one dataclass config read by the project's one config parser (`commands.config`): flags
come from its fields and `--config file.yaml` supplies any of them (flags win). A `--source` or path that
names nothing, or a folder in which no reader finds images, exits 1 with one line naming it and the layout
expected (never an empty dataset and exit 0); usage errors exit 2 (`commands.runtime`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_assistant.commands.config import UsageError, parse_config
from anomaly_assistant.commands.runtime import InputError, dispatch, note
from anomaly_assistant.data_builders.build import BuildConfig
from anomaly_assistant.data_builders.synth_inspect import CATEGORIES

PROG = "anomaly-assistant data"


@dataclass
class InspectConfig:
    """Counts per split / category / defect type / label, and an image grid with boxes and masks drawn."""

    path: str = field(
        metadata={"help": "a build output folder, a dataset folder or KIND:PATH", "positional": True}
    )
    grid: str = field(
        default="", metadata={"help": "PNG to write (default: <path>/preview.png or ./preview.png)"}
    )
    n: int = field(default=16, metadata={"help": "samples in the grid"})
    seed: int = field(default=0, metadata={"help": "which samples"})
    split: str = field(default="", metadata={"help": "only this split of a build output"})


@dataclass
class SynthCommandConfig:
    """Write SynthInspect as an MVTec-layout folder (readable by every MVTec tool and by `data build`)."""

    out: str = field(default="runs/synth_inspect", metadata={"help": "output folder"})
    n_train: int = field(default=20, metadata={"help": "normal training images per category"})
    n_test: int = field(default=20, metadata={"help": "test images per category (about half anomalous)"})
    size: int = field(default=256, metadata={"help": "image side in pixels"})
    categories: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"categories (default: all of {', '.join(CATEGORIES)})",
            "aliases": ["--category"],
            "choices": list(CATEGORIES),
            "metavar": "CATEGORY",
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})


# ------------------------------------------------------------------------------------------ commands


FOLDER_LAYOUT = "ROOT/good/*.png and ROOT/<defect>/*.png (or ROOT/<category>/..., or a ROOT/manifest.csv)"


def check_source(spec: str) -> None:
    """InputError now, before anything is written, when `--source SPEC` names nothing or holds no images.

    Only the generic folder reader is tried here (the one a wrong layout silently gives 0 images from); the
    other readers are checked by existence, and `cmd_build` rejects a build that read nothing at all.
    """
    from anomaly_assistant.data_builders.records import SkipLog
    from anomaly_assistant.data_builders.sources import READERS, detect_kind, read_folder

    kind, _, rest = spec.partition(":")
    if kind in READERS and rest:
        with_root = kind in ("anomaly_instruct", "visa_dr", "mmad", "manifest")  # KIND:PATH:IMAGE_ROOT
        path = Path(rest.partition(":")[0] if with_root else rest)
    else:
        kind, path = "", Path(spec)
    if not path.exists():
        raise InputError(f"--source {spec}: no such file or folder")
    if (kind or detect_kind(path)) != "folder":
        return
    skips = SkipLog()
    if read_folder(path, skips):
        return
    from anomaly_assistant.images import IMAGE_SUFFIXES

    flat = sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        raise InputError(f"--source {spec}: {flat} images sit directly in the folder, with no labels; "
                         f"sort them into {FOLDER_LAYOUT}")
    why = f" ({skips.items[0][1]}, ...)" if len(skips) else ""
    raise InputError(f"--source {spec}: no images found{why}; expected {FOLDER_LAYOUT}, an MVTec / VisA / "
                     "DeepPCB root, or a JSON / CSV / JSONL file")


def cmd_build(cfg: BuildConfig) -> int:
    """`data build`: SFT / GRPO / expert datasets, with a summary table."""
    from anomaly_assistant.data_builders.build import build

    if not cfg.sources and not (cfg.synth or cfg.textures):
        raise UsageError("nothing to build: give --source, --synth or --textures")
    for spec in cfg.sources:
        check_source(spec)
    import datasets

    datasets.disable_progress_bars()
    note(f"building datasets into {cfg.out} ...")
    result = build(cfg)
    if not any(result.splits.values()):
        skipped = "; " + result.skips.format(limit=3).replace("\n", "; ") if len(result.skips) else ""
        raise InputError(f"no images read from {', '.join(cfg.sources)}{skipped}")
    print(result.summary_table())
    print(
        f"\nwrote {result.out}/ (sft, grpo, expert, records, README.md, summary.json); "
        f"timings: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())
    )
    return 0


def _load_for_inspect(cfg: InspectConfig):
    from anomaly_assistant.data_builders.export import read_records_jsonl
    from anomaly_assistant.data_builders.records import SkipLog
    from anomaly_assistant.data_builders.sources import read_source

    path = Path(cfg.path)
    skips = SkipLog()
    if (path / "records").is_dir():
        files = sorted((path / "records").glob("*.jsonl"))
        if cfg.split:
            files = [f for f in files if f.stem == cfg.split]
        records = [r for f in files for r in read_records_jsonl(f)]
    else:
        records = read_source(cfg.path, skips)
    return records, skips


def cmd_inspect(cfg: InspectConfig) -> int:
    """`data inspect`: counts and a preview grid."""
    from anomaly_assistant.data_builders.preview import render_grid
    from anomaly_assistant.data_builders.records import summarize

    if not Path(cfg.path.split(":", 1)[-1] if not Path(cfg.path).exists() else cfg.path).exists():
        raise InputError(f"{cfg.path}: no such file or folder")
    records, skips = _load_for_inspect(cfg)
    if not records:
        why = f" ({skips.items[0][1]}, ...)" if len(skips) else ""
        raise InputError(f"{cfg.path}: no images found{why}; `data inspect` reads a build output folder or "
                         f"a dataset: {FOLDER_LAYOUT}, an MVTec / VisA / DeepPCB root, or a JSON / CSV file")
    counts = summarize(records)
    n1 = sum(r.gt_label for r in records)
    print(f"{len(records)} images: {len(records) - n1} normal, {n1} anomalous")
    for name in ("split", "source", "category", "defect_type"):
        items = sorted(counts[name].items(), key=lambda kv: (-kv[1], str(kv[0])))
        width = max((len(str(k)) for k, _ in items), default=4)
        print(f"\n{name}:")
        for k, v in items:
            print(f"  {str(k).ljust(width)}  {v:6d}")
    if len(skips):
        print("\n" + skips.format(limit=20))
    if records:
        target = (
            Path(cfg.grid)
            if cfg.grid
            else (
                Path(cfg.path) / "preview.png"
                if (Path(cfg.path) / "records").is_dir()
                else Path("preview.png")
            )
        )
        render_grid(records, target, n=cfg.n, seed=cfg.seed)
        print(f"\ngrid of {min(cfg.n, len(records))} samples (boxes red, masks yellow): {target}")
    return 0


def cmd_synth(cfg: SynthCommandConfig) -> int:
    """`data synth`: SynthInspect in the MVTec AD layout; prints one JSON summary line."""
    import time

    from anomaly_assistant.data_builders.synth_inspect import CATEGORIES, SynthConfig, SynthInspect

    cats = tuple(cfg.categories) or CATEGORIES
    gen = SynthInspect(SynthConfig(size=cfg.size, categories=cats, seed=cfg.seed))
    t0 = time.perf_counter()
    recs = gen.write_mvtec(cfg.out, cfg.n_train, cfg.n_test, progress=True)
    dt = time.perf_counter() - t0
    n1 = sum(r.gt_label for r in recs)
    print(
        json.dumps(
            {
                "out": cfg.out,
                "images": len(recs),
                "anomalous": n1,
                "categories": list(cats),
                "images_per_s": round(len(recs) / max(dt, 1e-9), 1),
            }
        )
    )
    return 0


COMMANDS = {
    "build": (BuildConfig, cmd_build, "build SFT / GRPO / expert datasets from sources and synthetic data"),
    "inspect": (InspectConfig, cmd_inspect, "print counts and save an image grid with boxes and masks"),
    "synth": (SynthCommandConfig, cmd_synth, "write SynthInspect images in the MVTec AD layout"),
}


def main(argv: list[str] | None = None, command: str = "data") -> int:
    """`anomaly-assistant data SUBCOMMAND ...`; usage errors print one line and return 2."""

    def run_one(name: str, rest: list[str]) -> int:
        cls, fn, _ = COMMANDS[name]
        try:
            cfg = parse_config(cls, rest, f"{PROG} {name}", (cls.__doc__ or "").strip())
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        return int(fn(cfg) or 0)

    helps = {name: help_text for name, (_, _, help_text) in COMMANDS.items()}
    argv = sys.argv[1:] if argv is None else argv
    return dispatch(argv, PROG, "Build and inspect training / evaluation data.", helps, run_one)
