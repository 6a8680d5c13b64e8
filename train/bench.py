"""`anomaly-assistant train bench`: SFT and GRPO step time with the expert ÷ without it, and peak memory.

One run, one tiny backbone (the same random weights), two models trained the same way:

- with the expert: the anomaly model (vision tower -> expert -> K anomaly tokens -> LLM) and its processor;
- without: the plain backbone the anomaly model was built from, with the family's own processor (no anomaly
  block, so no expert forward).

Both get the same LoRA adapters on the LLM (same rank, same targets), the same rows (the bench images with
the inspection prompt and one grammar answer), the same batch; GRPO samples exactly `completion_tokens`
tokens per completion on both (min = max new tokens), so generation does the same work.

On a shared machine other tenants' load comes and goes within seconds, so the paths run in many short
alternating rounds and each round's ratio compares two runs that were adjacent in time: the figure
(`<stage>_step_ratio`) is the median over rounds of (median step with ÷ median step without), after `warmup`
steps per run. The ratio of the fastest steps (`<stage>_fastest_ratio`: load only ever adds time) is printed
beside it.
Peak memory: the process's peak resident set after each path (it only grows: the first path's figure is its
own, the second's is the larger of both), and on a GPU the peak allocated per path.

It lives under train/ (not `anomaly-assistant bench`): it drives the trainers, and eval talks only to the
assistant (DESIGN.md).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from anomaly_assistant.commands.config import DEVICE_HELP, resolve_device


@dataclass
class TrainBenchConfig:
    """SFT and GRPO step time with the expert ÷ without it on one tiny backbone, and peak memory."""

    output_dir: str = field(
        default="runs/train-bench",
        metadata={
            "help": "folder of the result (train_bench.json) and the trainers' scratch",
            "aliases": ["--out"],
        },
    )
    family: str = field(
        default="qwen2_5_vl",
        metadata={"help": "backbone family", "choices": ("qwen2_5_vl", "llava_onevision", "llava")},
    )
    image_size: int = field(default=224, metadata={"help": "image side in pixels"})
    steps: int = field(default=4, metadata={"help": "timed steps per path and round"})
    warmup: int = field(default=2, metadata={"help": "untimed steps at the start of each run"})
    rounds: int = field(default=8, metadata={"help": "alternating with / without rounds"})
    batch_size: int = field(default=2, metadata={"help": "SFT rows per step"})
    grpo_batch_size: int = field(default=4, metadata={"help": "GRPO completions per step"})
    num_generations: int = field(default=2, metadata={"help": "GRPO group size"})
    completion_tokens: int = field(default=16, metadata={"help": "tokens sampled per GRPO completion"})
    seed: int = field(default=0, metadata={"help": "weights and data seed"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (generation included for GRPO)."""

    def __init__(self, sync: Any):
        self.sync, self.times, self._start = sync, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self._start)


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _models(cfg: TrainBenchConfig) -> dict[str, tuple[Any, Any]]:
    """{"with": (anomaly model, anomaly processor), "without": (plain backbone, plain processor)}."""
    import torch

    from anomaly_assistant import modeling, tiny

    backbone, plain = tiny.build_tiny(cfg.family, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    anomaly, processor = modeling.from_backbone(backbone, plain)
    return {"with": (anomaly, processor), "without": (backbone, plain)}


def _rows(cfg: TrainBenchConfig, n: int) -> tuple[list[dict], list[dict]]:
    """(SFT rows, GRPO rows) on SynthInspect images, the product's inspection prompt and a grammar answer."""
    from PIL import Image

    from anomaly_assistant.data_builders.synth_inspect import render
    from anomaly_assistant.prompts import INSPECTION_PROMPT

    answer = (
        '<think>The surface shows a thin bright line across the weave.</think><answer>{"verdict": '
        '"anomalous", "defect_type": "scratch", "boxes": [[40, 52, 120, 60]], "rationale": "a scratch"}'
        "</answer>"
    )
    images = [
        Image.fromarray(render("woven", i, seed=cfg.seed, size=cfg.image_size, anomalous=bool(i % 2)).image)
        for i in range(n)
    ]
    user = [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]
    sft = [
        {
            "images": [im],
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }
        for im in images
    ]
    grpo = [{"image": im, "prompt": [{"role": "user", "content": INSPECTION_PROMPT}]} for im in images]
    return sft, grpo


def _length_reward(completions, **kwargs) -> list[float]:
    """A cheap reward that still varies (completion length), so no group is all equal."""
    from anomaly_assistant.train.rewards import completion_text

    return [len(completion_text(c)) / 100.0 for c in completions]


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = r"model\.language_model\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )


def _common_args(cfg: TrainBenchConfig, out: Path, device: str, steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "learning_rate": 1e-4,
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 1000,
        "disable_tqdm": True,
        "use_cpu": device == "cpu",
        "bf16": device != "cpu",
        "seed": cfg.seed,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": False,
    }


def _sft_steps(
    cfg: TrainBenchConfig, model: Any, processor: Any, rows: list[dict], out: Path, device: str, sync: Any
) -> list[float]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    timer = StepTimer(sync)
    args = SFTConfig(
        **_common_args(cfg, out, device, cfg.warmup + cfg.steps),
        max_length=None,
        per_device_train_batch_size=cfg.batch_size,
        assistant_only_loss=False,
    )
    trainer = SFTTrainer(
        model=_lora(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[timer],
    )
    trainer.train()
    trainer.model.unload()  # the next round starts from the same base weights, without adapters
    return timer.times[cfg.warmup :]


def _grpo_steps(
    cfg: TrainBenchConfig, model: Any, processor: Any, rows: list[dict], out: Path, device: str, sync: Any
) -> list[float]:
    import datasets
    from trl import GRPOConfig

    from anomaly_assistant.processing import placeholder_token_ids
    from anomaly_assistant.train.grpo import GroupFilteringGRPOTrainer

    timer = StepTimer(sync)
    n = cfg.completion_tokens
    args = GRPOConfig(
        **_common_args(cfg, out, device, cfg.warmup + cfg.steps),
        per_device_train_batch_size=cfg.grpo_batch_size,
        num_generations=cfg.num_generations,
        max_completion_length=n,
        temperature=1.0,
        beta=0.0,
        generation_kwargs={
            "min_new_tokens": n,
            "suppress_tokens": placeholder_token_ids(processor.tokenizer, model),
        },
    )
    trainer = GroupFilteringGRPOTrainer(
        model=_lora(model),
        args=args,
        reward_funcs=[_length_reward],
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[timer],
        drop_zero_signal=False,
    )
    trainer.train()
    trainer.model.unload()
    return timer.times[cfg.warmup :]


def run(config: TrainBenchConfig) -> Path:
    """Time both stages on both models; write and print `train_bench.json`; returns its path."""
    import torch

    from anomaly_assistant.train.common import seed_everything

    device = resolve_device(config.device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seed_everything(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {k: (m.to(device).train(), p) for k, (m, p) in _models(config).items()}
    n_rows = max(config.batch_size, config.grpo_batch_size // config.num_generations) * (
        config.warmup + config.steps
    )
    sft_rows, grpo_rows = _rows(config, n_rows)
    # times[stage][path][round] = that run's timed steps
    times: dict[str, dict[str, list[list[float]]]] = {s: {"with": [], "without": []} for s in ("sft", "grpo")}
    memory: dict[str, dict[str, float]] = {"with": {}, "without": {}}
    started = time.perf_counter()
    for r in range(config.rounds):
        order = ("with", "without") if r % 2 == 0 else ("without", "with")
        for path in order:
            model, processor = models[path]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for stage, run_steps, rows in (("sft", _sft_steps, sft_rows), ("grpo", _grpo_steps, grpo_rows)):
                times[stage][path].append(run_steps(config, model, processor, rows, out / path, device, sync))
            memory[path].setdefault("peak_rss_mb", _peak_rss_mb())  # first round: "with" ran alone first
            if cuda:
                memory[path]["peak_gpu_mb"] = max(
                    memory[path].get("peak_gpu_mb", 0.0), torch.cuda.max_memory_allocated() / 2**20
                )
    result: dict[str, Any] = {}
    for stage in ("sft", "grpo"):
        runs = times[stage]
        rounds = [statistics.median(a) / statistics.median(b) for a, b in zip(runs["with"], runs["without"])]
        flat = {p: [t for run in runs[p] for t in run] for p in ("with", "without")}
        result[f"{stage}_step_ratio"] = statistics.median(rounds)
        result[f"{stage}_fastest_ratio"] = min(flat["with"]) / min(flat["without"])
        result[stage] = {
            "round_ratios": rounds,
            "median_with_s": statistics.median(flat["with"]),
            "median_without_s": statistics.median(flat["without"]),
            "steps_with_s": runs["with"],
            "steps_without_s": runs["without"],
        }
    anomaly = models["with"][0]
    result |= {
        "memory": memory,
        "seconds": time.perf_counter() - started,
        "config": asdict(config),
        "model": {
            "family": config.family,
            "parameters": sum(p.numel() for p in models["without"][0].parameters()),
            "expert_parameters": sum(p.numel() for p in anomaly.model.expert.parameters()),
            "anomaly_tokens": anomaly.model.expert.num_tokens,
        },
        "machine": {
            "device": device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    path = out / "train_bench.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    summary = {
        f"{s}_{kind}_ratio": round(result[f"{s}_{kind}_ratio"], 3)
        for s in ("sft", "grpo")
        for kind in ("step", "fastest")
    }
    summary |= {
        f"{s}_median_{p}_s": round(result[s][f"median_{p}_s"], 4)
        for s in ("sft", "grpo")
        for p in ("with", "without")
    }
    summary["peak_rss_mb"] = round(max(m["peak_rss_mb"] for m in memory.values()), 1)
    print(json.dumps(summary))
    return path
