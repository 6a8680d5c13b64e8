"""Stage 1: train the anomaly expert (LTFM + score head) on a frozen EfficientNet-Lite0 feature source.

`anomaly-assistant train expert --config FILE [overrides]` (or `run(ExpertStageConfig(...))`) reads the
`expert` export of `data build` (columns image, mask, gt_label), extracts the frozen features of every
image ONCE (the source never trains, so each epoch costs only the expert's own forward and backward), and
trains with class-balanced BCE on the image label plus focal + dice on the LTFM map where a mask exists
(`expert.losses.stage1_loss`; `--no-mask-loss` turns the mask term off to measure what it adds).

Every epoch: validation image AUROC (the score head) and pixel AUROC (the LTFM map) on the validation
split, one JSON line in `metrics.jsonl`, and a checkpoint `checkpoint-epoch-N/` (expert safetensors, AdamW
state as safetensors, trainer_state.json). `--resume` continues from the last checkpoint with the same data
order (each epoch's order is drawn from seed + epoch). The final expert goes to `OUTPUT_DIR/expert/`.

`train_expert` is the loop itself; few-shot fitting (`train/expert_fit.py`) reuses it on synthesised data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly_assistant.commands.config import DEVICE_HELP, UsageError, resolve_device
from anomaly_assistant.expert.fitted import build_source, efficientnet_expert_config, extract
from anomaly_assistant.expert.losses import resize_mask, stage1_loss
from anomaly_assistant.expert.model import AnomalyExpert
from anomaly_assistant.train.common import METRICS_FILE, InputError, load_export, seed_everything

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"


@dataclass
class ExpertStageConfig:
    """Stage 1: train the anomaly expert (LTFM + score head) on the `expert` export of `data build`."""

    data: str = field(
        default="runs/data", metadata={"help": "`data build` output folder (or its expert/ export)"}
    )
    output_dir: str = field(
        default="runs/expert", metadata={"help": "checkpoints, metrics.jsonl, final expert/"}
    )
    init: str = field(
        default="", metadata={"help": "start from this saved expert folder (default: a new expert)"}
    )
    image_size: int = field(
        default=256, metadata={"help": "feature source input side (area kept, aspect kept)"}
    )
    illumination: str = field(
        default="flatfield",
        metadata={
            "help": "lighting normalisation before features (as the reference screener does)",
            "choices": ["flatfield", "standardize", "none"],
        },
    )
    embed_dim: int = field(default=64, metadata={"help": "LTFM matching width"})
    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (cosine decay)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    mask_loss: bool = field(default=True, metadata={"help": "focal + dice on the map where masks exist"})
    mask_weight: float = field(default=1.0, metadata={"help": "weight of focal + dice against the BCE"})
    max_samples: int = field(default=0, metadata={"help": "cap on training rows (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={"help": "cap on validation rows (0 = all)"})
    seed: int = field(default=0, metadata={"help": "seed of the expert's init and the data order"})
    save_total_limit: int = field(
        default=2, metadata={"help": "epoch checkpoints kept (the newest; 0 keeps every one)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint in --output-dir"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# ------------------------------------------------------------------------------------------ samples


@dataclass
class Sample:
    """One training image as the expert reads it: frozen features, label and optional mask on the v° grid."""

    levels: list[torch.Tensor]
    v0: torch.Tensor
    label: int
    mask: torch.Tensor | None = None


def make_samples(
    source: Any,
    images: Sequence[Any],
    labels: Sequence[int],
    masks: Sequence[Any],
    illumination: str,
    scale: float | None = None,
    batch: int = 16,
    progress: bool = False,
) -> list[Sample]:
    """Extract frozen features once per image; masks (any size, None for normals) go to the v° grid."""
    from tqdm.auto import tqdm

    out: list[Sample] = []
    for s in tqdm(range(0, len(images), batch), desc="features", disable=not progress, unit="batch"):
        chunk = [im.convert("RGB") if im.mode not in ("RGB", "L") else im for im in images[s : s + batch]]
        for j, (levels, v0) in enumerate(extract(source, chunk, illumination, scale)):
            m = masks[s + j]
            grid = tuple(v0.shape[:2])
            if m is not None:
                mask = resize_mask(torch.as_tensor(np.asarray(m) > 0, dtype=torch.float32), grid)
            else:  # a normal image's mask is empty; an anomalous one without a mask trains the score only
                mask = torch.zeros(grid) if int(labels[s + j]) == 0 else None
            out.append(Sample(levels, v0, int(labels[s + j]), mask))
    return out


@torch.no_grad()
def samples_in_model(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    labels: Sequence[int],
    masks: Sequence[Any],
    batch: int = 8,
    progress: bool = False,
) -> list[Sample]:
    """Samples as the expert inside a chat model reads them: its levels and the model's own v° (its tower).

    A stage-1 expert trained on its feature source's tokens meets another v° in the chat model (the
    backbone's tower): the tensors that read v° start untrained there (`pipeline.install_expert`'s `kept`).
    These samples let `adapt_in_model` train them on what inference feeds them.
    """
    from tqdm.auto import tqdm

    from anomaly_assistant.prompts import INSPECTION_PROMPT

    content = [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]
    conversation = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    out: list[Sample] = []
    for s in tqdm(range(0, len(images), batch), desc="features", disable=not progress, unit="batch"):
        chunk = [im.convert("RGB") for im in images[s : s + batch]]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        features, levels = model.expert_inputs(inputs)
        for j, (lv, v0) in enumerate(zip(levels, features.v0)):
            v0 = v0.detach().float().cpu()
            grid = tuple(v0.shape[:2])
            m, label = masks[s + j], int(labels[s + j])
            if m is not None:
                mask = resize_mask(torch.as_tensor(np.asarray(m) > 0, dtype=torch.float32), grid)
            else:
                mask = torch.zeros(grid) if label == 0 else None
            out.append(Sample([x.detach().float().cpu() for x in lv], v0, label, mask))
    return out


def adapt_in_model(
    model: Any,
    processor: Any,
    data: str,
    epochs: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    mask_loss: bool = True,
    seed: int = 0,
    max_samples: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the expert inside `model` in place on the `expert` export of `data`, with the model's own v°.

    The stage-1 loss and schedule; only the expert's tensors change (its token projector gets no gradient
    from this loss). Returns validation image / pixel AUROC before and after, and the steps run.
    """
    expert = model.model.expert
    train = samples_in_model(model, processor, *_rows(data, "train", max_samples), progress=progress)
    try:
        val = samples_in_model(model, processor, *_rows(data, "validation", max_samples), progress=progress)
    except InputError:
        val = []
    first = next(expert.parameters())
    device, dtype = first.device, first.dtype
    expert.to("cpu", torch.float32)  # the samples are CPU tensors; the expert is small
    before = validate(expert, val) if val else {}
    for p in expert.parameters():
        p.requires_grad_(True)
    steps = max(1, math.ceil(len(train) / batch_size)) * epochs
    res = train_expert(expert, train, steps, batch_size, learning_rate, weight_decay, mask_loss, seed=seed,
                       progress=progress)
    expert.mark_trained()
    after = validate(expert, val) if val else {}
    expert.to(device, dtype)
    return {"steps": res["steps"], "train_rows": len(train), "loss": res.get("loss"),
            **{f"val_{k}_before": v for k, v in before.items()},
            **{f"val_{k}_after": v for k, v in after.items()}}


# ------------------------------------------------------------------------------------------ training loop


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_expert(
    expert: AnomalyExpert,
    samples: Sequence[Sample],
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    mask_loss: bool = True,
    mask_weight: float = 1.0,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    deadline: float | None = None,
    progress: bool = False,
    log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train `expert` in place for `steps` steps on `samples` (batches drawn without replacement per pass).

    The batch order of pass p is a permutation seeded by (seed, p), so a resumed run sees the same batches.
    `deadline` (time.monotonic) stops early; the result says how many steps ran and the mean losses.
    """
    from tqdm.auto import tqdm

    total = total_steps or (start_step + steps)
    opt = optimizer or torch.optim.AdamW(
        [p for p in expert.parameters() if p.requires_grad], lr=learning_rate, weight_decay=weight_decay
    )
    expert.train()
    n = len(samples)
    per_pass = max(1, math.ceil(n / batch_size))
    sums: dict[str, float] = {}
    done = 0
    bar = tqdm(range(start_step, start_step + steps), desc="expert", disable=not progress, unit="step")
    for step in bar:
        if deadline is not None and time.monotonic() > deadline:
            break
        pas, k = divmod(step, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + pas))
        idx = order[k * batch_size : (k + 1) * batch_size].tolist()
        batch = [samples[i] for i in idx]
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, learning_rate, warmup=max(1, total // 20))
        outputs = expert.forward_batch([s.levels for s in batch], [s.v0 for s in batch], use_ltfm=True)
        losses = stage1_loss(
            outputs,
            [s.label for s in batch],
            [s.mask for s in batch] if mask_loss else None,
            mask_weight=mask_weight,
        )
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        done += 1
        for key, val in losses.items():
            sums[key] = sums.get(key, 0.0) + float(val.detach())
        if log is not None:
            log({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}})
        bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
    expert.eval()
    return {"steps": done, "optimizer": opt, **{k: v / max(1, done) for k, v in sums.items()}}


@torch.no_grad()
def validate(expert: AnomalyExpert, samples: Sequence[Sample], batch: int = 32) -> dict[str, float | None]:
    """Image AUROC of the score head and pixel AUROC of the LTFM map over `samples`.

    Pixel AUROC here is on the v° grid (a cell is defective when the mask touches it), a cheap signal;
    `eval ad` measures it at full resolution.
    """
    from anomaly_assistant.eval import metrics

    expert.eval()
    scores, maps, masks, labels = [], [], [], []
    for s in range(0, len(samples), batch):
        chunk = samples[s : s + batch]
        for smp, out in zip(
            chunk, expert.forward_batch([c.levels for c in chunk], [c.v0 for c in chunk], use_ltfm=True)
        ):
            scores.append(float(torch.sigmoid(out.score_logit)))
            labels.append(smp.label)
            if smp.mask is not None:
                maps.append(out.ltfm_map.float().numpy())
                masks.append(smp.mask.numpy() > 0)  # a cell the defect touches
    pixel = metrics.pixel_auroc(masks, maps) if masks and any(m.any() for m in masks) else None
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": pixel}


# ------------------------------------------------------------------------------------------ the stage


def _rows(data: str, split: str, max_samples: int) -> tuple[list, list[int], list]:
    ds = load_export(data, "expert", split, ("image", "mask", "gt_label"), max_samples)
    return list(ds["image"]), [int(x) for x in ds["gt_label"]], list(ds["mask"])


def _save_checkpoint(folder: Path, expert: AnomalyExpert, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    expert.save_pretrained(folder)
    tensors, meta = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous().clone()
    meta["param_groups"] = opt.state_dict()["param_groups"]
    save_file(tensors, str(folder / OPTIMIZER_NAME))
    (folder / STATE_NAME).write_text(json.dumps({**state, **meta}, indent=2) + "\n")


def _load_checkpoint(folder: Path, expert: AnomalyExpert, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    loaded = AnomalyExpert.from_pretrained(folder)
    expert.load_state_dict(loaded.state_dict())
    state = json.loads((folder / STATE_NAME).read_text())
    tensors = load_file(str(folder / OPTIMIZER_NAME))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def _checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-epoch-N` folders in output_dir, oldest first."""
    return sorted(Path(output_dir).glob("checkpoint-epoch-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest `checkpoint-epoch-N` folder in output_dir, if any."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch checkpoints (0 keeps every one), as the HF Trainer does."""
    import shutil

    if keep > 0:
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)


def run(config: ExpertStageConfig) -> Path:
    """Train, validate every epoch, checkpoint, and save the final expert; returns its folder."""
    device = resolve_device(config.device)
    if device != "cpu":
        raise UsageError("train expert runs on CPU (features are cached once; the expert is small)")
    seed_everything(config.seed)
    out = Path(config.output_dir)
    if config.init:
        if not (Path(config.init) / "expert.safetensors").is_file():
            raise InputError(f"--init {config.init}: not a saved expert folder")
        expert = AnomalyExpert.from_pretrained(config.init)
    else:
        expert = efficientnet_expert_config(
            source_options={"image_size": config.image_size},
            embed_dim=config.embed_dim,
            class_code_dim=config.embed_dim,
        )
        expert = AnomalyExpert(expert)
    source = build_source(expert.config)
    train_rows = _rows(config.data, "train", config.max_samples)
    try:
        val_rows = _rows(config.data, "validation", config.max_eval_samples)
    except InputError:
        val_rows = None
    train = make_samples(source, *train_rows, config.illumination, progress=config.progress)
    val = make_samples(source, *val_rows, config.illumination, progress=config.progress) if val_rows else []
    per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    total = per_epoch * config.epochs
    opt = torch.optim.AdamW(
        [p for p in expert.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    start_epoch = 0
    if config.resume and (ckpt := last_checkpoint(out)) is not None:
        start_epoch = int(_load_checkpoint(ckpt, expert, opt)["epoch"])
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_FILE
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        res = train_expert(
            expert,
            train,
            per_epoch,
            config.batch_size,
            config.learning_rate,
            config.weight_decay,
            config.mask_loss,
            config.mask_weight,
            config.seed,
            opt,
            start_step=epoch * per_epoch,
            total_steps=total,
            progress=config.progress,
        )
        expert.mark_trained()
        row = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * per_epoch,
            "seconds": time.perf_counter() - t0,
            **{k: v for k, v in res.items() if k not in ("optimizer", "steps")},
        }
        if val:
            row.update({f"val_{k}": v for k, v in validate(expert, val).items()})
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        _save_checkpoint(
            out / f"checkpoint-epoch-{epoch + 1}", expert, opt, {"epoch": epoch + 1, "config": asdict(config)}
        )
        _prune_checkpoints(out, config.save_total_limit)
    expert.mark_trained()
    return expert.save_pretrained(out / "expert")
