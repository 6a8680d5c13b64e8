"""Backbone families: a registry of family modules, one module per family, shared helpers.

`FAMILIES` maps each family name to its module; it is the only list of families. Everything else is derived
from it: `family_of` (model types), `get` (which also registers the family's classes with transformers'
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` on first use), `modeling` (which loads every
family so saved anomaly checkpoints load), `tiny` (tiny configs), and `input_frame` (the box frame of training
targets).

A family module holds everything the family needs:

- names: `FAMILY` (its registry name), `CONFIG_CLASS`, `MODEL_CLASS`, `PROCESSOR_CLASS` (transformers' classes
  or an image-only processor subclass that builds and loads without torchvision), `IMAGE_TOKEN`, `EOS_TOKEN`,
  `PAD_TOKEN`, `SPECIAL_TOKENS`, and `CHAT_TEMPLATE` (with `{% generation %}` markers for TRL's assistant-only
  loss);
- the real checkpoints' resize rule as module constants, used by `build_image_processor()` (the PIL image
  processor; with no arguments it resizes exactly like the real checkpoint) and `build_processor(tokenizer)`;
- `load(path_or_id, **kw) -> (model, processor)`: a real checkpoint (hub id or local dir) or a saved tiny one;
- `vision_features(model, inputs, levels=None) -> VisionFeatures`: multi-level vision-tower features in raster
  order + the visual tokens v° the LLM sees, per image. It runs in the caller's grad mode: wrap it in
  `torch.no_grad()` for a frozen tower; leave grads on when the projector/merger behind v° is trained;
- `default_levels(config) -> tuple[int, ...]`: which `hidden_states` indices the expert reads by default;
- `input_frame(processor, original_size) -> Frame`: original pixels -> the model-input pixel frame of boxes
  (`processor` may be a processor or an image processor);
- `embeds_forward_kwargs(inputs, inputs_embeds) -> dict`: the forward's kwargs on precomputed embeddings;
- `tiny_config(tokenizer, text) -> config` and `build_tiny_processor(tokenizer)`: the offline test model;
- the anomaly classes, built from `injection`'s mixins and `processing.AnomalyBlockMixin`, named by
  `ANOMALY_CONFIG_CLASS` (whose `model_type` is "anomaly_" + the plain config's), `ANOMALY_MODEL_CLASS` and
  `ANOMALY_PROCESSOR_CLASS`.

How to add a fourth family: copy the closest module (e.g. `llava.py`) to `backbones/<name>.py`, replace what
differs (the transformers classes, template, resize constants, `vision_features`, `input_frame`, tiny config),
and add one line `"<name>": f"{__name__}.<name>"` to `FAMILIES`. Nothing else changes: processors, Auto*
registration, tiny models, data-builder frames, `from_backbone` and the assistant all find the family through
the registry (tests/backbones/test_registry.py builds a family from outside the package this way).

Level indices always index the vision tower's `hidden_states` tuple: 0 is the patch embedding (input of the
first block), k is the output of block k-1. The helpers below (`embed_inputs`, `image_token_id`,
`text_embeddings`) are family-independent: every family marks image positions in `input_ids` with one
placeholder id and scatters the per-image embeddings into them in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

import torch

from ..finding import Frame

# The registry: family name -> its module. Adding a family is one file in this package and one line here.
FAMILIES: dict[str, str] = {
    "qwen2_5_vl": f"{__name__}.qwen2_5_vl",
    "llava_onevision": f"{__name__}.llava_onevision",
    "llava": f"{__name__}.llava",
}

# The anomaly block the expert fills: <|anomaly_start|> <|anomaly_level|> <|anomaly_pad|>xK <|anomaly_end|>.
# The level slot is one position whose embedding the model sets, inside its forward, to the level word that
# the expert's score selects (slightly / moderately / highly), so prompts never depend on a score known in
# advance.
ANOMALY_START, ANOMALY_PAD, ANOMALY_END = "<|anomaly_start|>", "<|anomaly_pad|>", "<|anomaly_end|>"
ANOMALY_LEVEL = "<|anomaly_level|>"
# Chat-template fragment every family's template starts each message with: `texts` (the message's text parts)
# and `n_images` (its image slots), from string or list contents alike.
TEMPLATE_MESSAGE_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set texts = [message['content']] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | list -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
)
ANOMALY_TOKENS: tuple[str, str, str, str] = (ANOMALY_START, ANOMALY_PAD, ANOMALY_END, ANOMALY_LEVEL)
from ..expert.config import LEVEL_WORDS as LEVEL_WORDS  # noqa: E402  (re-exported: the expert decides the word)


@dataclass
class VisionFeatures:
    """Per-image vision features of one processor batch, all in raster order (row-major, y then x).

    `level_grids[i][j]` is image i's `hidden_states[levels[j]]` as an (H, W, C) grid on the vision tower's
    patch grid (Qwen2.5-VL: the 14-px patch grid, 2x the token grid; LLaVA-OV: the base view; LLaVA: CLS
    dropped). `v0[i]` is the (h, w, D) grid of visual tokens the LLM sees for the whole image (D = LLM hidden
    size). `image_embeds[i]` is the full (num_image_tokens[i], D) sequence the model scatters into image i's
    placeholder tokens; v° occupies `image_embeds[i][v0_offset[i] : v0_offset[i] + h * w]`, row-major.
    """

    family: str
    levels: tuple[int, ...]
    level_grids: list[list[torch.Tensor]]  # [image][level] -> (H, W, C)
    v0: list[torch.Tensor]  # [image] -> (h, w, D)
    image_embeds: list[torch.Tensor]  # [image] -> (num_image_tokens, D)
    num_image_tokens: list[int]  # placeholder tokens per image in input_ids
    v0_offset: list[int]  # where v° starts inside that image's placeholder run
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.v0)

    @property
    def v0_slices(self) -> list[slice]:
        """Where v° sits within each image's placeholder run."""
        return [slice(o, o + v.shape[0] * v.shape[1]) for o, v in zip(self.v0_offset, self.v0)]


def get(family: str) -> ModuleType:
    """The module of a registered family; the first call also registers its classes with transformers."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {list(FAMILIES)}")
    return _load(FAMILIES[family])


@cache
def _load(module_name: str) -> ModuleType:
    """Import a family module and register it with the Auto* classes, once per process."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    module = importlib.import_module(module_name)
    # the plain config loads through the family's (image-only) processor: AutoProcessor would otherwise need
    # torchvision for Qwen2.5-VL / LLaVA-OneVision, or silently return only the tokenizer
    AutoProcessor.register(module.CONFIG_CLASS, module.PROCESSOR_CLASS, exist_ok=True)
    anomaly_config = module.ANOMALY_CONFIG_CLASS
    AutoConfig.register(anomaly_config.model_type, anomaly_config, exist_ok=True)
    AutoModelForImageTextToText.register(anomaly_config, module.ANOMALY_MODEL_CLASS, exist_ok=True)
    AutoProcessor.register(anomaly_config, module.ANOMALY_PROCESSOR_CLASS, exist_ok=True)
    return module


def family_of(config: Any) -> str:
    """Infer the family from a config (or a model, or a plain config dict) by its model_type.

    A family's model types are its plain config's and that with the "anomaly_" prefix of its anomaly config.
    """
    config = getattr(config, "config", config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError("config has no model_type")
    by_model_type = {get(family).CONFIG_CLASS.model_type: family for family in FAMILIES}
    name = model_type.removeprefix("anomaly_")
    if name in by_model_type:
        return by_model_type[name]
    raise ValueError(
        f"model_type {model_type!r} is not a supported backbone; supported: {sorted(by_model_type)}"
    )


def input_frame(family: str, original_size: tuple[int, int], processor: Any = None) -> Frame:
    """Original pixels -> `family`'s model-input pixels, the frame its boxes are written in.

    With `processor` (a loaded checkpoint's), its resize settings; without, the real checkpoint's default
    resize rule (`build_image_processor()` of the family): the frame of training targets built without a
    checkpoint.
    """
    module = get(family)
    return module.input_frame(processor if processor is not None else _default_image_processor(family),
                              tuple(original_size))


@cache
def _default_image_processor(family: str) -> Any:
    return get(family).build_image_processor()


def image_token_id(model_or_config: Any) -> int:
    """The placeholder id the processor repeats for every visual token of an image."""
    config = getattr(model_or_config, "config", model_or_config)
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:  # older LLaVA configs spell it image_token_index
        token_id = config.image_token_index
    return int(token_id)


def anomaly_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the anomaly markers; raises when the tokenizer lacks them (see `add_anomaly_tokens`)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ANOMALY_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise KeyError(f"tokenizer lacks anomaly tokens {missing}; call add_anomaly_tokens first")
    return ids


def missing_anomaly_tokens(tokenizer: Any) -> list[str]:
    """The anomaly markers the tokenizer's vocabulary lacks."""
    have = set(tokenizer.get_vocab())
    return [t for t in ANOMALY_TOKENS if t not in have]


def add_anomaly_tokens(tokenizer: Any) -> int:
    """Add the anomaly markers as special tokens (idempotent); returns how many were new.

    A real checkpoint needs `model.resize_token_embeddings(len(tokenizer))` afterwards when this is > 0.
    """
    new = missing_anomaly_tokens(tokenizer)
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return len(new)


def ensure_anomaly_tokens(model: Any, tokenizer: Any) -> int:
    """Add the anomaly markers to `tokenizer` and grow the model's embeddings to fit; returns tokens added.

    A real checkpoint lacks the markers: their new embedding rows are initialised by transformers' default
    (mean of the existing rows) and are meant to be trained. Tiny models already have them (no-op).
    """
    added = add_anomaly_tokens(tokenizer)
    if len(tokenizer) > text_embeddings(model).num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return added


def load_pretrained(model_class: Any, processor_class: Any, path_or_id: str,
                    processor_kwargs: dict | None = None, anomaly_tokens: bool = True,
                    **model_kwargs: Any) -> tuple[Any, Any]:
    """(model, processor) of one family from a hub id or local directory (real checkpoint or saved tiny one).

    `anomaly_tokens` adds the anomaly markers (and embedding rows) where the checkpoint lacks them.
    """
    model = model_class.from_pretrained(path_or_id, **model_kwargs)
    processor = processor_class.from_pretrained(path_or_id, **(processor_kwargs or {}))
    if anomaly_tokens:
        ensure_anomaly_tokens(model, processor.tokenizer)
    return model, processor


def text_embeddings(model: Any) -> torch.nn.Embedding:
    """The LLM's input token embedding table (shared by all families)."""
    return model.get_input_embeddings()


def embed_inputs(model: Any, input_ids: torch.Tensor, image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """`inputs_embeds` with each image's embeddings scattered into its placeholder tokens, in order.

    This is what every family's forward does internally; doing it here lets a caller compute the image
    embeddings once (e.g. via `vision_features`) and overwrite further positions (anomaly pads) before
    calling the model with `inputs_embeds`.
    """
    embeds = text_embeddings(model)(input_ids)  # [B, T, D]
    mask = input_ids == image_token_id(model)  # [B, T]
    if image_embeds:
        flat = torch.cat(list(image_embeds), dim=0).to(embeds.dtype)  # [sum N_i, D]
        if int(mask.sum()) != flat.shape[0]:
            raise ValueError(
                f"{int(mask.sum())} image placeholder tokens but {flat.shape[0]} image embeddings"
            )
        embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), flat)
    return embeds


def count_placeholders(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in `input_ids`, in reading order (one run per image)."""
    runs: list[int] = []
    for row in input_ids.tolist():
        run = 0
        for t in row + [None]:
            if t == token_id:
                run += 1
            elif run:
                runs.append(run)
                run = 0
    return runs


def check_placeholders(inputs: dict, model: Any, n_tokens: Sequence[int]) -> None:
    """Raise if the prompt's image-placeholder runs differ from the image token counts the tower produced."""
    if "input_ids" in inputs:
        runs = count_placeholders(inputs["input_ids"], image_token_id(model))
        if runs != list(n_tokens):
            raise ValueError(f"placeholder runs {runs} do not match image token counts {list(n_tokens)}")


def spread_levels(depth: int, n: int = 4) -> tuple[int, ...]:
    """N hidden-state indices evenly spread over a tower of `depth` blocks, ending at the last block."""
    return tuple(sorted({max(1, round(depth * (i + 1) / n)) for i in range(n)}))


def resolve_levels(levels: Sequence[int] | None, default: tuple[int, ...], n_hidden: int) -> tuple[int, ...]:
    """Validate requested levels (negative ones count from the end) against `n_hidden` hidden states."""
    chosen = tuple(default if levels is None else levels)
    out = tuple(lv + n_hidden if lv < 0 else lv for lv in chosen)
    bad = [lv for lv in out if not 0 <= lv < n_hidden]
    if bad:
        raise ValueError(f"levels {bad} out of range for {n_hidden} hidden states")
    return out
