"""AnomalyAssistant and ChatSession: the multi-turn API that the CLI, UI, HTTP API and evaluation call.

    assistant = AnomalyAssistant.from_pretrained()  # the embedded default model; or a folder / hub id
    session = assistant.chat(references=["good1.png", "good2.png"])
    finding = session.inspect("part.png")      # Finding: verdict, score, boxes (original px), map, rationale
    session.ask("What could have caused it?")  # follow-ups see the whole history
    assistant.screen(images, references=refs)  # expert only, no LLM: verdict + score + map

Reference images are matched training-free (`expert.reference.ReferenceScreener` on pretrained
EfficientNet-Lite0 features); with a language model their per-image maps also drive the expert's token
selection. Without references and without a trained expert there is no meaningful map, and the Finding says
so in `notes` instead of inventing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import lookup
from .expert.reference import reference_warning
from .finding import Box, Finding, boxes_in_frame, location_words, size_words
from .grammar import parse_answer
from .images import FLIPS, ImageLike, load_image
from .localize import DEFAULT_THRESHOLD, boxes_for_verdict, check_threshold, is_anomalous
from .prompts import INSPECTION_PROMPT
from .scoring import concluded_verdict

NO_MAP_NOTE = "no anomaly map: the expert is untrained and no reference images were given"
# Answer fields a checkpoint may have the expert write (`config.expert_answer_fields`), and where the
# generated answer is cut to write them: the grammar's JSON has verdict, defect_type, boxes, rationale.
EXPERT_FIELDS = ("verdict", "boxes")
BOXES_KEY = '"boxes":'


TYPE_KEY = '"defect_type":'
_TYPE_SPAN = 60  # characters after the type key with no boxes key: take the type from them, stop waiting


class _StopAtBoxes:
    """A stopping criterion per row: the answer has reached its boxes key (or rambles past the type key)."""

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def _done(self, text: str) -> bool:
        at = text.find(TYPE_KEY)
        return BOXES_KEY in text or (at >= 0 and len(text) - at > _TYPE_SPAN)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([self._done(t) for t in texts], device=input_ids.device)


@dataclass
class _CachedPrompt:
    """The first pass of an expert-written answer: its prompt ids and the key/value cache generate left."""

    input_ids: torch.Tensor  # [B, T]
    cache: Any

    def reusable_for(self, ids: torch.Tensor) -> Any:
        """The cache cut to the first prompt when the continuation `ids` (one row) starts with it, else None.

        The continuation repeats the first prompt (image tokens, expert tokens, question) and adds the
        rewritten answer head, so only that head is encoded again, not the image.
        """
        if self.cache is None or self.input_ids.shape[0] != 1 or not hasattr(self.cache, "crop"):
            return None
        first = self.input_ids[0].to(ids.device)
        if ids.shape[0] <= first.shape[0] or not torch.equal(ids[: first.shape[0]], first):
            return None
        extra = int(self.cache.get_seq_length()) - first.shape[0]  # the first pass's own answer tokens
        if extra < 0:
            return None
        self.cache.crop(-extra)  # this transformers' crop takes how many tokens to drop, as a negative count
        return self.cache


def _type_word(text: str) -> str | None:
    """The defect name a (possibly malformed) JSON value starts with; None for null or nothing readable.

    `'holes in the bottle', verdict...` -> `holes in the bottle`.
    """
    value = text.lstrip(" :\"'")
    if value.startswith("null"):
        return None
    word = re.match(r"[A-Za-z][A-Za-z _-]{0,39}", value)
    return word.group(0).strip() if word else None


@dataclass
class GenerationSettings:
    """Decoding for inspections and chat (greedy by default: evaluation protocols assume it)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def kwargs(self, **overrides: Any) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_p": self.top_p}
        return out | overrides


def _rationale_agreeing(rest: str, verdict: str, score: float, boxes: Sequence[Box],
                        size: tuple[int, int], threshold: float) -> str:
    """`rest` (the rationale, its closing quote, what follows) with a rationale agreeing with `verdict`.

    The LLM writes the rationale after the expert's verdict and boxes, but when its own reading of the image
    was the opposite it can still conclude so ("No defect is visible" under ANOMALOUS). An inspector must
    never read a verdict and a rationale that disagree, so such a rationale is replaced by what the expert
    measured, in words without a verdict word of their own (`scoring.concluded_verdict` reads "good" as one).
    """
    quoted = re.match(r'((?:[^"\\]|\\.)*)"(.*)', rest, flags=re.DOTALL)
    if quoted is None:  # the rationale never closed: left as generated (the parser reports it)
        return rest
    said = concluded_verdict(quoted.group(1))
    if said is None or said == verdict:
        return rest
    if verdict == "anomalous" and boxes:
        box = boxes[0].as_list()
        sentence = (f"The {size_words(box, size)} region at the {location_words(box, size)} stands out "
                    f"(expert score {score:.2f}, at or above the threshold {threshold:.2f}).")
    elif verdict == "anomalous":
        sentence = f"Something stands out (expert score {score:.2f}, threshold {threshold:.2f})."
    else:
        sentence = f"Nothing stands out (expert score {score:.2f}, below the threshold {threshold:.2f})."
    return json.dumps(sentence)[1:-1] + '"' + quoted.group(2)


def _drafting(model: Any, batch_size: int, kwargs: dict) -> dict:
    """`kwargs` asking for corpus drafting (`lookup`) where it applies, else unchanged.

    transformers drafts for one sequence at a time, greedily, and a reused cache would not line up with the
    drafted tokens, so batches, sampling and continued caches decode one token per forward. (A streamer
    gets the accepted tokens of each forward at once.)
    """
    if (getattr(model, "lookup_corpus", None) is None or batch_size != 1 or kwargs.get("do_sample")
            or kwargs.get("past_key_values") is not None):
        return kwargs
    return {"prompt_lookup_num_tokens": lookup.DRAFT_TOKENS} | kwargs


def _path_of(source: Any) -> str | None:
    return str(source) if isinstance(source, (str, os.PathLike)) else None


def _expert_view(image: Image.Image, output: Any, match: Any,
                 map_fusion: float) -> tuple[np.ndarray | None, float | None]:
    """The expert's (map at original size, score) for one inspected image, or (None, None) without one.

    With a reference match the map keeps the match's full resolution: the reference map itself, or, fused with
    the LTFM map, the same blend as the expert's own (`map_fusion`) with only the LTFM part upsampled from the
    token grid, so boxes and overlays follow the defect rather than the grid's cells.
    """
    if output is None or not output.meaningful:
        return None, None
    full = match.anomaly_map.numpy() if match is not None else None
    if full is not None and full.shape == (image.size[1], image.size[0]):
        if output.map_source == "reference":
            return full, float(output.score)
        if output.map_source == "ltfm+reference":
            ltfm = _upsample(output.ltfm_map.detach(), image.size)
            fused = (1.0 - map_fusion) * ltfm + map_fusion * np.clip(full, 0.0, 1.0)
            return fused.astype(np.float32), float(output.score)
    return _upsample(output.anomaly_map.detach(), image.size), float(output.score)


def _upsample(amap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32 at the image's original size (size = (W, H))."""
    t = torch.as_tensor(amap, dtype=torch.float32)[None, None]
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out[0, 0].clamp(0, 1).numpy()


class AnomalyAssistant:
    """An inspection model (LLM + expert) or an expert-only screener, behind one API."""

    def __init__(self, model: Any = None, processor: Any = None, device: str | torch.device = "cpu",
                 generation: GenerationSettings | None = None, screener_config: Any = None,
                 threshold: float = DEFAULT_THRESHOLD):
        self.model = model.to(device).eval() if model is not None else None
        self.processor = processor
        self.device = torch.device(device)
        self.generation = generation or GenerationSettings()
        if screener_config is None and getattr(getattr(model, "config", None), "reference_matching", None):
            from .expert.reference import ScreenerConfig

            screener_config = ScreenerConfig.from_dict(model.config.reference_matching)
        self._screener_config = screener_config  # None: the screener's defaults
        self.threshold = check_threshold(threshold)  # decides unless a session or a call gives its own
        self._source = None  # EfficientNet-Lite0, shared by every reference screener of this assistant
        self._screeners: OrderedDict[str, Future] = OrderedDict()  # screeners by reference content (LRU)
        self._screeners_lock = threading.Lock()  # guards the cache and the source, never a fit
        # a FittedExpert (`expert fit`): screens images that come without references
        self.fitted_expert = None
        self._suppress_tokens: list[int] = []  # placeholders a generated answer must never hold
        if processor is not None:
            from .processing import placeholder_token_ids

            processor.tokenizer.padding_side = "left"  # batched generation appends to the right
            self._suppress_tokens = placeholder_token_ids(processor.tokenizer, self.model)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, device: str | torch.device = "cpu",
                        feature_source: str = "backbone", threshold: float = DEFAULT_THRESHOLD,
                        **model_kwargs: Any) -> AnomalyAssistant:
        """Load an anomaly checkpoint, or wrap a plain Qwen2.5-VL / LLaVA-OneVision / LLaVA with a new expert.

        None loads the embedded default model (`default_model.model_dir()`: an ordinary checkpoint folder,
        assembled offline from installed packages on first use). `"tiny"` / `"tiny:<family>"` builds a tiny
        random model in code (offline demos and tests).
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from . import default_model, modeling

        if path_or_id is None:
            path_or_id = str(default_model.model_dir())
        if path_or_id == "tiny" or path_or_id.startswith("tiny:"):
            family = path_or_id.partition(":")[2] or "qwen2_5_vl"
            model, processor = modeling.tiny_anomaly_model(family, feature_source=feature_source)
            return cls(model, processor, device=device, threshold=threshold)
        config = AutoConfig.from_pretrained(path_or_id)
        if config.model_type.startswith("anomaly_"):
            model = AutoModelForImageTextToText.from_pretrained(path_or_id, **model_kwargs)
            processor = AutoProcessor.from_pretrained(path_or_id)
            if os.path.isdir(path_or_id):  # its training answers, to draft from (`lookup`)
                model.lookup_corpus = lookup.load_corpus(path_or_id, processor.tokenizer)
        else:
            model, processor = modeling.load_backbone_as_anomaly(path_or_id, feature_source, **model_kwargs)
        return cls(model, processor, device=device, threshold=threshold)

    @classmethod
    def expert_only(cls, feature_source: str = "efficientnet_lite0", screener_config: Any = None,
                    threshold: float = DEFAULT_THRESHOLD, expert: str | None = None) -> AnomalyAssistant:
        """No language model: `screen` / `inspect` give expert Findings from reference matching.

        Such an assistant needs references for every image it screens.
        """
        if feature_source != "efficientnet_lite0":
            raise ValueError(
                "expert-only screening without a model uses the efficientnet_lite0 feature source"
            )
        assistant = cls(None, None, screener_config=screener_config, threshold=threshold)
        if expert:  # a folder written by `anomaly-assistant expert fit`: no references needed per image
            from .expert.fitted import FittedExpert

            assistant.fitted_expert = FittedExpert.load(expert)
        return assistant

    @property
    def has_llm(self) -> bool:
        return self.model is not None

    def save_pretrained(self, directory: str) -> None:
        if not self.has_llm:
            raise ValueError("an expert-only assistant has no model to save")
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        # keep drafting from the same answers: the corpus of the folder the model was loaded from
        corpus = os.path.join(str(self.model.name_or_path), lookup.CORPUS_FILE)
        if self.model.lookup_corpus is not None and os.path.isfile(corpus):
            shutil.copy2(corpus, directory)

    # -- references ------------------------------------------------------------------------------------------
    def reference_screener(self, references: Sequence[ImageLike], cache_size: int = 8):
        """A training-free screener fitted on the reference normals (EfficientNet-Lite0 features).

        Fitted screeners are cached by the references' pixels, so sessions (UI users, batch jobs) that share a
        reference set fit it once: the first thread to ask fits it, concurrent askers wait for that fit, and
        fits of different sets run in parallel.
        """
        from .expert.reference import ReferenceScreener, ScreenerConfig
        from .expert.sources import EfficientNetLite0Source

        refs = [load_image(r) for r in references]
        if not refs:
            raise ValueError("reference matching needs at least one reference image")
        digest = hashlib.sha256()
        for im in refs:
            digest.update(repr(im.size).encode())
            digest.update(im.tobytes())
        key = digest.hexdigest()
        with self._screeners_lock:
            pending = self._screeners.get(key)
            fits_here = pending is None
            if fits_here:
                pending = self._screeners[key] = Future()
                while len(self._screeners) > cache_size:
                    self._screeners.popitem(last=False)
                if self._source is None:
                    self._source = EfficientNetLite0Source()
            self._screeners.move_to_end(key)
        if fits_here:
            try:
                screener = ReferenceScreener(self._source, self._screener_config or ScreenerConfig())
                pending.set_result(screener.fit(refs))
            except BaseException as exc:
                with self._screeners_lock:  # a failed fit is not cached: the next ask tries again
                    if self._screeners.get(key) is pending:
                        del self._screeners[key]
                pending.set_exception(exc)
        return pending.result()

    # -- sessions and batch APIs -----------------------------------------------------------------------------
    def chat(self, references: Sequence[ImageLike] | None = None, image: ImageLike | None = None,
             threshold: float | None = None) -> ChatSession:
        """A conversation about one part, with optional reference normals; threshold None: the assistant's."""
        return ChatSession(self, references=references, image=image, threshold=threshold)

    def screen(self, images: Sequence[ImageLike], references: Sequence[ImageLike] | None = None,
               screener: Any = None, threshold: float | None = None) -> list[Finding]:
        """Expert only (no LLM): verdict, calibrated score, anomaly map at original size, boxes per image."""
        threshold = self._decision_threshold(threshold)
        pils = [load_image(im) for im in images]
        screener = screener or (self.reference_screener(references) if references else self.fitted_expert)
        if screener is not None:
            kind = getattr(screener, "map_source", "reference")
            return [self._finding_from_map(im, r.anomaly_map, r.score, src, kind, threshold,
                                           getattr(r, "unlikeness", None))
                    for im, r, src in zip(pils, screener.predict(pils, threshold), images)]
        if not self.has_llm or not self.model.expert.is_trained:
            raise ValueError(f"cannot screen: {NO_MAP_NOTE}; pass references=[...] or load a trained expert")
        return [self._finding_from_map(im, _upsample(out.anomaly_map, im.size), float(out.score), src,
                                       out.map_source, threshold)
                for im, src, out in zip(pils, images, self.expert_outputs(pils))]

    def expert_outputs(self, images: Sequence[ImageLike],
                       references: Sequence[ImageLike] | None = None) -> list[Any]:
        """The checkpoint's expert on each image, one image per pass: what `screen` and answers are made of.

        Each an `ExpertOutput` (LTFM map and score logit, the selected tokens; with references also the
        reference map and the fused score), for studying the expert inside a checkpoint.
        """
        if not self.has_llm:
            raise ValueError("an expert-only assistant has no model expert; use screen()")
        pils = [load_image(im) for im in images]
        screener = self.reference_screener(references) if references else None
        views = self._view_scores(pils) or [None] * len(pils)
        outputs = []
        for im, match, view in zip(pils, self._reference_matches(pils, screener), views):
            inputs = self._encode([im], [[{"role": "user", "content": [{"type": "image"}]}]],
                                  generation=False)
            with torch.no_grad():
                _, (out,) = self.model.run_expert(inputs, reference=None if match is None else [match],
                                                  view_scores=[view])
            outputs.append(out)
        return outputs

    def _view_scores(self, images: list[Image.Image]) -> list[list[float]] | None:
        """Per image, the LTFM scores of the flipped views the checkpoint names (`ExpertConfig.score_views`).

        Each view goes through the processor and the vision tower like the image itself, so any family works;
        the scores travel with the call (`anomaly_context`), never on the shared model.
        """
        names = self.model.expert.config.score_views if self.has_llm else ()
        if not names or not self.model.expert.is_trained:
            return None
        scores = []
        for im in images:
            views = [im.transpose(FLIPS[name]) for name in names]
            inputs = self._encode(views, [[{"role": "user", "content": [{"type": "image"}]}]] * len(views),
                                  generation=False)
            with torch.no_grad():
                _, outs = self.model.run_expert(inputs)
            scores.append([float(torch.sigmoid(o.score_logit)) for o in outs])
        return scores

    def inspect_batch(self, images: Sequence[ImageLike], references: Sequence[ImageLike] | None = None,
                      threshold: float | None = None, **generate_kwargs: Any) -> list[Finding]:
        """Inspect several images in one batched generation (expert-only assistants screen instead)."""
        threshold = self._decision_threshold(threshold)
        if not self.has_llm:
            return self.screen(images, references, threshold=threshold)
        screener = self.reference_screener(references) if references else None
        pils = [load_image(im) for im in images]
        conversations = [[{"role": "user",
                           "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]}]
                         for _ in pils]
        texts, outputs, matches = self._generate(pils, conversations, screener, threshold=threshold,
                                                 **generate_kwargs)
        return [self._finding_from_text(im, t, o, m, src, threshold)
                for im, t, o, m, src in zip(pils, texts, outputs, matches, images)]

    # -- internals -------------------------------------------------------------------------------------------
    def _decision_threshold(self, threshold: float | None) -> float:
        """The call's threshold, or the assistant's when the call gives none."""
        return self.threshold if threshold is None else check_threshold(threshold)

    def _encode(self, images: list[Image.Image], conversations: list[list[dict]],
                generation: bool = True) -> dict:
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=generation, tokenize=False)
                 for c in conversations]
        batch = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def _reference_matches(self, images: list[Image.Image], screener: Any) -> list[Any]:
        if screener is None:
            return [None] * len(images)
        from .expert import ReferenceMatch

        return [ReferenceMatch(torch.from_numpy(r.anomaly_map), r.score, getattr(r, "unlikeness", None))
                for r in screener.predict(images)]

    @property
    def _map_fusion(self) -> float:
        """The weight of the reference map where the model's expert fuses it with its LTFM map."""
        return float(self.model.expert.config.map_fusion) if self.has_llm else 1.0

    @property
    def expert_fields(self) -> tuple[str, ...]:
        """Answer fields this checkpoint has the expert write (`config.expert_answer_fields`)."""
        fields = getattr(self.model.config, "expert_answer_fields", None) or () if self.has_llm else ()
        return tuple(f for f in EXPERT_FIELDS if f in fields)

    @torch.no_grad()
    def _generate(self, images: list[Image.Image], conversations: list[list[dict]], screener: Any = None,
                  streamer: Any = None, threshold: float | None = None, **generate_kwargs: Any):
        """Greedy generation for a batch of conversations.

        With a `threshold` (inspection turns) and a checkpoint that names `expert_fields`, those fields of
        the answer are the expert's decision at that threshold (`_expert_written`). Returns (texts, expert
        outputs, reference matches), one of each per conversation.
        """
        matches = self._reference_matches(images, screener)
        reference = matches if screener is not None else None
        views = self._view_scores(images)
        grounded = threshold is not None and bool(self.expert_fields) and streamer is None
        inputs = self._encode(images, conversations)
        kwargs = _drafting(self.model, len(images), self.generation.kwargs(**generate_kwargs))
        if grounded:  # stop each answer where the expert's fields begin
            prompt_length = inputs["input_ids"].shape[1]
            kwargs["stopping_criteria"] = [_StopAtBoxes(self.processor.tokenizer, prompt_length)]
        with self.model.anomaly_context(reference=reference, view_scores=views) as ctx:
            generated = self.model.generate(**inputs, **kwargs, suppress_tokens=self._suppress_tokens or None,
                                            streamer=streamer, return_dict_in_generate=grounded)
        sequences = generated.sequences if grounded else generated
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]
        texts = [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        outputs = ctx.outputs or [None] * len(images)
        if grounded:
            prompt = _CachedPrompt(inputs["input_ids"], getattr(generated, "past_key_values", None))
            texts = self._expert_written(images, conversations, texts, outputs, matches, reference, threshold,
                                         new_tokens.shape[1], generate_kwargs, prompt, views)
        return texts, outputs, matches

    def _expert_written(self, images: list[Image.Image], conversations: list[list[dict]], texts: list[str],
                        outputs: list[Any], matches: list[Any], reference: Any, threshold: float,
                        used_tokens: int, generate_kwargs: dict,
                        prompt: _CachedPrompt | None = None, views: list | None = None) -> list[str]:
        """Answers whose `expert_fields` are the expert's decision; the LLM writes the rest around them.

        The first pass stopped each answer at `"boxes":`. Here the verdict in that prefix is replaced by the
        expert's (score against `threshold`: the same rule as the Finding's score), the expert's boxes are
        written in the model-input frame, and the LLM continues with the rationale, conditioned on both. An
        answer without the boxes key, or an image without a meaningful expert decision, is left as generated.
        """
        from .backbones import family_of, get

        prefixes: dict[int, str] = {}
        decided: dict[int, tuple[str, float, list[Box], tuple[int, int]]] = {}  # the expert's verdicts
        for i, (im, text, out, match) in enumerate(zip(images, texts, outputs, matches)):
            amap, score = _expert_view(im, out, match, self._map_fusion)  # exactly what the Finding shows
            head, type_at = text.find("<answer>"), text.find(TYPE_KEY)
            said = re.search(r"verdict\W{0,4}(normal|anomalous)", text[head:]) if head >= 0 else None
            if score is None or said is None or type_at < head:
                continue
            anomalous = is_anomalous(score, threshold)
            verdict = "anomalous" if anomalous else "normal"
            think = re.search(r"<think>(.*?)</think>", text[:head], flags=re.DOTALL)
            think = think.group(1).strip() if think else ""
            if "verdict" not in self.expert_fields:
                verdict, anomalous = said.group(1), said.group(1) == "anomalous"
            elif said.group(1) != verdict:  # the model's reasoning led elsewhere: say what decided instead
                relation = "at or above" if anomalous else "below"
                think = (f"The expert's anomaly score {score:.2f} is {relation} the decision threshold "
                         f"{threshold:.2f}, so the part is {verdict}.")
            defect_type = _type_word(text[type_at + len(TYPE_KEY):]) if anomalous else None
            # The JSON head is rewritten from what was read, so a malformed one never reaches the parser.
            fields = json.dumps({"verdict": verdict, "defect_type": defect_type})[:-1]  # without the "}"
            prefix = f"<think>{think}</think>\n<answer>{fields}, {BOXES_KEY}"
            if "boxes" in self.expert_fields:
                boxes = []
                if anomalous:
                    boxes = boxes_for_verdict(amap, threshold)
                frame = get(family_of(self.model.config)).input_frame(self.processor, im.size)
                written = boxes_in_frame([b.as_list() for b in boxes], frame)
                prefix += f" {json.dumps(written)}, " + '"rationale": "'
                if "verdict" in self.expert_fields:
                    decided[i] = (verdict, score, boxes, im.size)
            prefixes[i] = prefix
        if not prefixes:
            return texts
        rows = sorted(prefixes)
        continued = [conversations[i] + [{"role": "assistant", "content": [{"type": "text",
                                                                            "text": prefixes[i]}]}]
                     for i in rows]
        prompts = [self.processor.apply_chat_template(c, continue_final_message=True, tokenize=False)
                   for c in continued]
        batch = self.processor(images=[images[i] for i in rows], text=prompts, return_tensors="pt",
                               padding=True)
        batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
        kwargs = self.generation.kwargs(**generate_kwargs)
        kwargs["max_new_tokens"] = max(1, kwargs["max_new_tokens"] - used_tokens)
        if prompt is not None and len(images) == 1:  # reuse the first pass's image and prompt encoding
            kwargs["past_key_values"] = prompt.reusable_for(batch["input_ids"][0])
            if kwargs["past_key_values"] is not None:  # the image is in the cache: not encoded again
                batch = {k: v for k, v in batch.items() if k not in ("pixel_values", "expert_pixel_values")}
        kwargs = _drafting(self.model, len(rows), kwargs)
        rest_reference = [reference[i] for i in rows] if reference is not None else None
        rest_views = [views[i] for i in rows] if views is not None else None
        with self.model.anomaly_context(reference=rest_reference, view_scores=rest_views):
            sequences = self.model.generate(**batch, **kwargs, suppress_tokens=self._suppress_tokens or None)
        rests = self.processor.batch_decode(sequences[:, batch["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        out = list(texts)
        for i, rest in zip(rows, rests):
            if i in decided:
                rest = _rationale_agreeing(rest, *decided[i], threshold)
            out[i] = prefixes[i] + rest.rstrip()
        return out

    def _finding_from_map(self, image: Image.Image, amap: np.ndarray, score: float, source: Any,
                          map_source: str, threshold: float, unlikeness: float | None = None) -> Finding:
        anomalous = is_anomalous(score, threshold)
        warning = reference_warning(unlikeness)
        return Finding(
            verdict="anomalous" if anomalous else "normal", score=float(score),
            boxes=boxes_for_verdict(amap, threshold) if anomalous else [],
            anomaly_map=amap.astype(np.float32), source="expert", image_size=image.size,
            image_path=_path_of(source), map_source=map_source, notes=[warning] if warning else [],
        )

    def _finding_from_text(self, image: Image.Image, text: str, output: Any, match: Any, source: Any,
                           threshold: float) -> Finding:
        """Parse the model's answer; fall back to the expert's verdict and map when it does not parse."""
        from .backbones import family_of, get

        amap, score = _expert_view(image, output, match, self._map_fusion)
        map_source = output.map_source if score is not None else None  # "reference" also for the match map
        notes = [] if score is not None else [NO_MAP_NOTE]
        warning = reference_warning(getattr(match, "unlikeness", None))
        if warning:
            notes.append(warning)
        frame = get(family_of(self.model.config)).input_frame(self.processor, image.size)
        parsed = parse_answer(text, frame=frame)
        path = _path_of(source)
        if parsed.verdict is not None and parsed.has_answer_block:
            return Finding(
                verdict=parsed.verdict, score=score, boxes=parsed.boxes, defect_type=parsed.defect_type,
                rationale=parsed.rationale, think=parsed.think, anomaly_map=amap, raw_text=text,
                parse_error="; ".join(parsed.problems) or None, source="model", image_size=image.size,
                image_path=path, notes=notes, map_source=map_source,
            )
        problem = "; ".join(parsed.problems) or "answer did not parse"
        if score is None:
            # Neither the model nor the expert decided: flag for review rather than pass a possibly bad part.
            notes.append("no verdict from the model or the expert: flagged as anomalous for human review")
            return Finding(verdict="anomalous", score=None, raw_text=text, parse_error=problem, source="none",
                           image_size=image.size, image_path=path, notes=notes)
        anomalous = is_anomalous(score, threshold)
        return Finding(
            verdict="anomalous" if anomalous else "normal", score=score,
            boxes=boxes_for_verdict(amap, threshold) if anomalous else [], anomaly_map=amap, raw_text=text,
            parse_error=problem, source="expert", image_size=image.size, image_path=path, notes=notes,
            map_source=map_source,
        )


@dataclass
class _Turn:
    role: str
    text: str


class ChatSession:
    """One conversation about one image (plus optional reference normals); every turn sees the whole history.

    `threshold` decides this session's verdicts and boxes; None follows the assistant's.
    """

    def __init__(self, assistant: AnomalyAssistant, references: Sequence[ImageLike] | None = None,
                 image: ImageLike | None = None, threshold: float | None = None):
        self.assistant = assistant
        self.threshold = None if threshold is None else check_threshold(threshold)
        self.references = [load_image(r) for r in references] if references else []
        self._screener = (assistant.reference_screener(self.references) if self.references
                          else assistant.fitted_expert)
        self.image: Image.Image | None = load_image(image) if image is not None else None
        self.image_source: Any = image
        self.turns: list[_Turn] = []
        self.last_finding: Finding | None = None

    @property
    def history(self) -> list[dict]:
        """The conversation so far as [{"role", "content"}] with plain-text content."""
        return [{"role": t.role, "content": t.text} for t in self.turns]

    def reset(self, image: ImageLike | None = None) -> None:
        """Start over (same references), optionally about a new image."""
        self.turns, self.last_finding = [], None
        if image is not None:
            self.image, self.image_source = load_image(image), image

    def _messages(self, question: str) -> list[dict]:
        messages, first_user = [], True
        for turn in [*self.turns, _Turn("user", question)]:
            if turn.role == "user" and first_user:
                messages.append({"role": "user",
                                 "content": [{"type": "image"}, {"type": "text", "text": turn.text}]})
                first_user = False
            else:
                messages.append({"role": turn.role, "content": [{"type": "text", "text": turn.text}]})
        return messages

    def inspect(self, image: ImageLike | None = None, **generate_kwargs: Any) -> Finding:
        """Inspect `image` (starting a new conversation about it) or the session's image.

        Returns a Finding; with a language model the exchange also joins the conversation history.
        """
        if image is not None:
            self.reset(image)
        if self.image is None:
            raise ValueError("no image to inspect: pass one to inspect() or chat(image=...)")
        a = self.assistant
        if not a.has_llm:
            finding = (a.screen([self.image], screener=self._screener, threshold=self.threshold)[0]
                       if self._screener else None)
            if finding is None:
                raise ValueError(f"cannot inspect without a language model: {NO_MAP_NOTE}")
        else:
            threshold = a._decision_threshold(self.threshold)
            texts, outputs, matches = a._generate([self.image], [self._messages(INSPECTION_PROMPT)],
                                                  self._screener, threshold=threshold, **generate_kwargs)
            finding = a._finding_from_text(self.image, texts[0], outputs[0], matches[0], self.image_source,
                                           threshold)
            self.turns += [_Turn("user", INSPECTION_PROMPT), _Turn("assistant", texts[0])]
        finding.image_path = finding.image_path or _path_of(self.image_source)
        self.last_finding = finding
        return finding

    def ask(self, text: str, image: ImageLike | None = None, **generate_kwargs: Any) -> str:
        """A follow-up question (or the first one, with `image=`); the reply is plain text."""
        return "".join(self.stream(text, image=image, **generate_kwargs))

    def stream(self, text: str, image: ImageLike | None = None, **generate_kwargs: Any) -> Iterator[str]:
        """Like `ask`, yielding the reply as it is generated."""
        from transformers import TextIteratorStreamer

        a = self.assistant
        if not a.has_llm:
            raise ValueError("this assistant has no language model (expert-only); load a model to chat")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("ask() needs a non-empty question")
        if image is not None:
            self.reset(image)
        if self.image is None:
            raise ValueError("no image in this conversation: pass image= with the first question")
        streamer = TextIteratorStreamer(a.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:
            try:
                result["out"] = a._generate([self.image], [self._messages(text)], self._screener,
                                            streamer=streamer, **generate_kwargs)
            except BaseException as exc:  # surface errors from the worker thread to the caller
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        reply = result["out"][0][0]
        self.turns += [_Turn("user", text), _Turn("assistant", reply)]
