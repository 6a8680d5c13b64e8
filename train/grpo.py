"""Stage 3: GRPO with TRL's `GRPOTrainer` on the GRPO export of `data build`, rewarded by `train.rewards`.

`run(config)` follows the order in `train.common` (seed, checked data, model, adapters, trainer, final save),
so bad input (a missing column or image file, solution boxes in another input frame than the model's, a LoRA
target that matches nothing, a batch that cannot hold whole groups) fails before the first step; an unknown
config key already fails in `parse_config`.

Groups whose completions all earn the same total reward carry no signal: their advantages are zero, so with
`beta = 0` (TRL's default) they add no gradient, but TRL still counts their tokens in the "dapo" loss's
normaliser, which shrinks the step of every informative group (easy normal images make many such groups).
`zero_signal_groups: drop` (the default) masks their completions out of the loss and the normaliser, the
cheap half of DAPO's dynamic sampling (which would also generate replacements); `keep` is TRL's own handling.
The fraction dropped is logged as `frac_groups_dropped` beside TRL's `frac_reward_zero_std`; TRL's entropy
and clipping figures then describe the kept groups only.

Logged to `metrics.jsonl` in the output dir at every logging step: `reward` (the mean weighted total),
`rewards/<term>_reward/mean` per term, and `verdict/accuracy`, `verdict/miss_rate` and
`verdict/false_alarm_rate` (apart, since an average hides misses).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import GRPOConfig, GRPOTrainer

from anomaly_assistant import backbones
from anomaly_assistant.commands.config import resolve_device
from anomaly_assistant.finding import Frame
from anomaly_assistant.processing import placeholder_token_ids
from anomaly_assistant.train.common import (
    InputError,
    JsonlMetricsCallback,
    StageConfig,
    load_export,
    load_model,
    prepare_trainable,
    resume_checkpoint,
    save_final,
    seed_everything,
    trainer_arguments,
)
from anomaly_assistant.train.distributed import WeightsDigestCallback
from anomaly_assistant.train.rewards import Reward, RewardConfig, reward_functions


@dataclass(kw_only=True)
class GrpoStageConfig(StageConfig):
    """GRPO options on top of the shared stage options (YAML keys = field names; `rewards:` is a section)."""

    rewards: RewardConfig = field(default_factory=RewardConfig, metadata={
        "help": "weights of the reward terms in the total (0 switches a term off) and the length budget"})
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt (a group)"})
    batch_size: int = field(default=4, metadata={
        "help": "completions per device and step; a multiple of --num-generations"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    max_completion_length: int = field(default=256, metadata={"help": "most tokens generated per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the completions"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the starting model (0: none)"})
    scale_rewards: str = field(default="group", metadata={
        "help": "advantage scaling: by the std of each group, of the batch, or none",
        "choices": ("group", "batch", "none")})
    zero_signal_groups: str = field(default="drop", metadata={
        "help": "groups whose rewards are all equal: drop them from the loss, or keep them (TRL's handling)",
        "choices": ("drop", "keep")})

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: GRPO compares 2 completions or more")
        if self.batch_size % self.num_generations:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --num-generations "
                             f"{self.num_generations} (each step scores whole groups)")
        if not reward_functions(self.rewards)[0]:
            raise ValueError("every --rewards-* weight is 0: nothing to optimise")


def reward_columns(funcs: list[Reward]) -> tuple[str, ...]:
    """The dataset columns the reward functions need: their parameters without a default, but completions."""
    names: dict[str, None] = {}
    for fn in funcs:
        fn = getattr(fn, "func", fn)  # functools.partial
        for p in inspect.signature(fn).parameters.values():
            if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "completions":
                names[p.name] = None
    return tuple(names)


def check_box_frame(dataset: Any, model: Any, processor: Any) -> None:
    """Raise InputError when the export's boxes are not in the frame this model's processor gives its input.

    `data build` writes solution boxes in the frame of the real checkpoint's resize rule unless given
    `--processor`; a model that resizes differently would be rewarded against boxes that miss the defect.
    """
    family = backbones.family_of(model.config)
    for frame_json in dict.fromkeys(dataset["frame"]):
        exported = Frame.from_json(json.loads(frame_json))
        expected = backbones.input_frame(family, exported.original_size, processor)
        if exported != expected:
            w, h = exported.original_size
            raise InputError(
                f"the export's boxes for {w}x{h} images are in a {exported.input_size} input frame, but this "
                f"{family} model sees {expected.input_size}: rebuild the data with `data build --backbone "
                f"{family} --processor <the model folder>`")


def run(config: GrpoStageConfig) -> Path:
    """Train with GRPO; save the final model (`save_pretrained`) to `<output_dir>/final`, return its path."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    funcs, weights = reward_functions(config.rewards)
    columns = reward_columns(funcs)
    train = load_export(config.data, "grpo", config.split, ("image", "prompt", *columns), config.max_samples)
    loaded = load_model(config, device)
    if "frame" in columns:
        check_box_frame(train, loaded.model, loaded.processor)
    model = prepare_trainable(loaded.model, config)
    args = GRPOConfig(
        **trainer_arguments(config, device),
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        scale_rewards=config.scale_rewards,
        reward_weights=weights,
        generation_kwargs={"suppress_tokens": placeholder_token_ids(loaded.processor.tokenizer, model)},
    )
    resume = resume_checkpoint(config)
    trainer = GroupFilteringGRPOTrainer(
        model=model, args=args, reward_funcs=funcs, train_dataset=train, processing_class=loaded.processor,
        callbacks=[JsonlMetricsCallback(config.output_dir, resume), WeightsDigestCallback()],
        drop_zero_signal=config.zero_signal_groups == "drop",
    )
    trainer.train(resume_from_checkpoint=resume)
    return save_final(trainer.model, loaded, config)


class GroupFilteringGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` that masks groups whose total rewards are all equal out of the loss (see module doc)."""

    def __init__(self, *args: Any, drop_zero_signal: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.drop_zero_signal = drop_zero_signal
        self._flat_rows = None  # [rows of all processes] bool: the row's group earned one total reward

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, *args, expert_pixel_values=None, **kwargs):
        """TRL's scoring forward, also handing the CNN input of an efficientnet-source expert to the model.

        TRL forwards only the image keys it knows; the processor's `expert_pixel_values` (kept with the batch
        by `_generate_and_score_completions`, handed over by `_compute_loss`) reach the anomaly model through
        a forward pre-hook that lives for this call only, on one chunk (the whole batch).
        """
        if expert_pixel_values is None:
            expert_pixel_values = getattr(self, "_expert_pixel_values", None)
        if expert_pixel_values is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs)
        inner = next(m for m in model.modules() if hasattr(m, "expert_levels_from"))

        def add_pixels(module, args, kw):
            if kw.get("expert_pixel_values") is None:
                kw["expert_pixel_values"] = expert_pixel_values
            return args, kw

        handle = inner.register_forward_pre_hook(add_pixels, with_kwargs=True)
        try:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, input_ids.size(0), *args, **kwargs)
        finally:
            handle.remove()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        group = self.num_generations if self.model.training else self.num_generations_eval
        total = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)  # [N]
        grouped = total.view(-1, group)  # [N / G, G]
        flat = (grouped.max(dim=1).values - grouped.min(dim=1).values) <= 1e-6  # [N / G]
        self._flat_rows = flat.repeat_interleave(group)  # [N]
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        self._expert_pixel_values = inputs.get("expert_pixel_values")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._expert_pixel_values = None

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        size = getattr(self.processing_class, "expert_image_size", None)
        if size:  # an efficientnet-source expert: its CNN input travels with the batch (one image per row)
            from anomaly_assistant.processing import cnn_pixel_values

            images = [row["image"] if "image" in row else row["images"][0] for row in inputs]
            out["expert_pixel_values"] = cnn_pixel_values(images, int(size)).to(out["completion_ids"].device)
        if not (self.drop_zero_signal and self.model.training):
            return out
        n = len(out["advantages"])
        start = self.accelerator.process_index * n
        local = self._flat_rows[start:start + n]  # [n] rows of this process
        mask = out["completion_mask"]  # [n, C]
        mask = out["completion_mask"] = mask * (~local).unsqueeze(1).to(mask.dtype)
        loss_mask = mask * out["tool_mask"] if "tool_mask" in out else mask
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        self._metrics["train"]["frac_groups_dropped"].append(self._flat_rows.float().mean().item())
        return out
