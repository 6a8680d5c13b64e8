"""Data-builder speed on this CPU: SynthInspect images/s and conversation rows/s.

    python -m anomaly_assistant.data_builders.bench [--n 270] [--size 256] [--rows 2000]

Prints one JSON object. Rates per wall-clock second depend on what else runs on the machine (`load_avg_1m`
is printed alongside); `synth_images_per_cpu_s` counts only this process's CPU time. SynthInspect is timed
in memory (render + defect + mask + boxes, one process) and with PNG writing; conversations as
`build_samples` on records with known frames (templated path, no teacher) and as full SFT rows (with the
image bytes read), the two costs a build pays per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def bench_synth(n: int, size: int) -> dict[str, float]:
    """Time SynthInspect rendering in memory and with PNG writing, the per-image cost of a synthetic build."""
    from anomaly_assistant.data_builders.synth_inspect import SynthInspect

    gen = SynthInspect(size=size, seed=0)
    gen.sample(0)  # warm caches (texture photos, imports)
    t0, c0 = time.perf_counter(), time.process_time()
    anomalous = sum(gen.sample(i).gt_label for i in range(n))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        per_cat = max(1, n // len(gen.config.categories))
        t1 = time.perf_counter()
        written = gen.write_mvtec(tmp, n_train=0, n_test=per_cat)
        dt_write = time.perf_counter() - t1
    return {
        "synth_images": n,
        "synth_anomalous": anomalous,
        "synth_size": size,
        "synth_images_per_s": round(n / dt, 1),
        "synth_images_per_cpu_s": round(n / cpu, 1),
        "synth_images_per_s_with_png": round(len(written) / dt_write, 1),
    }


def bench_conversations(rows: int) -> dict[str, float]:
    """Time templated conversation building and SFT row export, the per-image text cost of a build."""
    from anomaly_assistant.backbones import input_frame
    from anomaly_assistant.data_builders.conversations import build_samples
    from anomaly_assistant.data_builders.export import sft_row
    from anomaly_assistant.data_builders.records import Record

    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "x.png"
        Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(img)
        frame = input_frame("qwen2_5_vl", (256, 256))
        recs = [
            Record(
                str(img),
                i % 2,
                gt_boxes=[[10, 20, 60 + i % 50, 90]] if i % 2 else [],
                defect_type="scratch" if i % 2 else None,
                category="nut",
                image_size=(256, 256),
            )
            for i in range(max(1, rows // 4))
        ]
        t0 = time.perf_counter()
        samples = [s for i, r in enumerate(recs) for s in build_samples(r, frame, rng=i)]
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        for s in samples:
            sft_row(s)
        dt_rows = time.perf_counter() - t1
    return {
        "conversation_rows": len(samples),
        "conversation_rows_per_s": round(len(samples) / dt, 1),
        "sft_rows_per_s_with_image_bytes": round(len(samples) / dt_rows, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both timings and print one JSON object, so speed can be compared across machines."""
    parser = argparse.ArgumentParser(
        prog="python -m anomaly_assistant.data_builders.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--n", type=int, default=270, help="SynthInspect images to time")
    parser.add_argument("--size", type=int, default=256, help="SynthInspect image side")
    parser.add_argument("--rows", type=int, default=2000, help="conversation rows to time")
    args = parser.parse_args(argv)
    out = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    out |= bench_synth(args.n, args.size)
    out |= bench_conversations(args.rows)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
