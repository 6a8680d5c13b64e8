"""What several processes of one training run check about each other.

Under `accelerate launch` / `torchrun` every rank holds its own copy of the model, and DDP keeps the copies
equal only if every rank takes the same steps on gradients averaged the same way. `WeightsDigestCallback`
makes that checkable: at the end of training each rank writes `<output_dir>/rank-digests/rank<N>.json` with
a SHA-256 of its trainable weights (names and bytes, in name order), so a divergence (a rank that skipped a
step, a parameter outside DDP's buckets) shows as two different digests instead of a quietly worse model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

DIGEST_DIR = "rank-digests"


def trainable_digest(model: Any) -> tuple[str, int]:
    """SHA-256 of the trainable parameters (name + float32 bytes, sorted by name) and their count."""
    digest = hashlib.sha256()
    count = 0
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
        count += param.numel()
    return digest.hexdigest(), count


class WeightsDigestCallback(TrainerCallback):
    """Each rank of a multi-process run writes the digest of its trainable weights when training ends."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None or args.world_size < 2:
            return
        sha, count = trainable_digest(model)
        folder = Path(args.output_dir) / DIGEST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": args.process_index, "world_size": args.world_size, "step": state.global_step,
                  "sha256": sha, "trainable": count}
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(record) + "\n")


def read_digests(output_dir: str | Path) -> list[dict[str, Any]]:
    """The digests the ranks of a run wrote, in rank order."""
    folder = Path(output_dir) / DIGEST_DIR
    return sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"])
