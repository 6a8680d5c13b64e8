"""AnomalyAssistant / ChatSession on a tiny model: Findings, fallbacks, multi-turn history, batch,
screening."""


import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from anomaly_assistant import AnomalyAssistant, Box, Finding
from anomaly_assistant.backbones import get
from anomaly_assistant.grammar import render_answer
from anomaly_assistant.images import ImageError


def _texture(seed: int, size=(160, 120), defect: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = 120 + 20 * np.sin(np.arange(size[0])[None, :] / 3.0) + rng.normal(0, 4, (size[1], size[0]))
    img = Image.fromarray(np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype("uint8"))
    if defect:
        ImageDraw.Draw(img).ellipse((70, 40, 95, 62), fill=(10, 10, 10))
    return img


@pytest.fixture(scope="module")
def assistant():
    return AnomalyAssistant.from_pretrained("tiny")


@pytest.fixture(scope="module")
def references():
    return [_texture(s) for s in range(4)]


def _forced(assistant, text):
    """generate kwargs that make the model write exactly `text` (then stop): exercises the real parse path."""
    tok = assistant.processor.tokenizer
    target = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    prompt_len = {}

    def allowed_tokens(batch_id, input_ids):
        start = prompt_len.setdefault(batch_id, len(input_ids))
        i = len(input_ids) - start
        return [target[i]] if i < len(target) else [tok.eos_token_id]

    return {"prefix_allowed_tokens_fn": allowed_tokens, "max_new_tokens": len(target) + 1}


def test_a_valid_answer_becomes_a_finding_in_original_pixels(assistant, references):
    image = _texture(9, size=(641, 479), defect=True)
    frame = get("qwen2_5_vl").input_frame(assistant.processor, image.size)
    answer = render_answer(
        "A dark round spot in the middle.", "anomalous", "hole", [[100, 80, 140, 120]], "a hole"
    )
    session = assistant.chat(references=references)
    finding = session.inspect(image, **_forced(assistant, answer))
    assert finding.source == "model" and finding.parse_error is None
    assert finding.verdict == "anomalous" and finding.defect_type == "hole" and finding.rationale == "a hole"
    expected = frame.to_original(Box(100, 80, 140, 120))
    assert finding.boxes[0].as_list() == expected.as_list()
    assert finding.boxes[0].x2 > 140  # scaled up: 641 px wide original vs a smaller model input
    assert finding.anomaly_map.shape == (479, 641) and 0.0 <= finding.score <= 1.0
    assert session.history[-1]["content"] == answer


def test_malformed_answer_falls_back_to_the_expert(assistant, references):
    image = _texture(10, defect=True)
    forced = _forced(assistant, "I think it is fine {oops")
    finding = assistant.chat(references=references).inspect(image, **forced)
    assert finding.source == "expert" and finding.parse_error
    assert finding.anomaly_map is not None and finding.anomaly_map.shape == (120, 160)
    assert finding.verdict == ("anomalous" if finding.score >= 0.5 else "normal")
    assert finding.raw_text.startswith("I think it is fine")
    assert finding.map_source == "reference"  # untrained expert + references: the reference match's map
    back = Finding.loads(finding.dumps())
    assert back.parse_error == finding.parse_error and back.verdict == finding.verdict
    assert back.map_source == "reference"


def test_no_references_and_untrained_expert_says_so(assistant):
    finding = assistant.chat().inspect(_texture(11), max_new_tokens=8)
    assert finding.anomaly_map is None and finding.score is None and finding.map_source is None
    assert any("no anomaly map" in n for n in finding.notes)
    assert finding.parse_error  # a random tiny model does not write the grammar
    with pytest.raises(ValueError, match="no reference images"):
        assistant.screen([_texture(11)])


def test_follow_ups_see_the_history_and_stream_matches_ask(assistant, references):
    session = assistant.chat(references=references)
    session.inspect(_texture(12, defect=True), max_new_tokens=6)
    reply = session.ask("What could have caused it?", max_new_tokens=6)
    assert isinstance(reply, str)
    pieces = list(session.stream("How can it be prevented?", max_new_tokens=6))
    assert "".join(pieces).strip() == session.history[-1]["content"]
    roles = [t["role"] for t in session.history]
    assert roles == ["user", "assistant"] * 3
    assert session.history[2]["content"] == "What could have caused it?"
    # the prompt of the third turn contains both earlier turns
    prompt = assistant.processor.apply_chat_template(session._messages("next"), tokenize=False)
    assert "What could have caused it?" in prompt and "How can it be prevented?" in prompt
    session.reset()
    assert session.history == [] and session.image is not None


def test_inspect_batch_matches_single_sessions(assistant, references):
    images = [_texture(13, defect=True), _texture(14, size=(120, 200))]
    batch = assistant.inspect_batch(images, references=references, max_new_tokens=6)
    singles = [assistant.chat(references=references).inspect(im, max_new_tokens=6) for im in images]
    for b, s in zip(batch, singles):
        assert b.raw_text == s.raw_text and b.verdict == s.verdict
        assert b.score == pytest.approx(s.score, abs=1e-6)


def test_expert_only_screening_needs_no_model(references):
    screener = AnomalyAssistant.expert_only()
    assert not screener.has_llm
    good, bad = screener.screen([_texture(20), _texture(21, defect=True)], references=references)
    assert good.anomaly_map.shape == (120, 160) and bad.source == "expert"
    assert good.map_source == bad.map_source == "reference"
    assert not any("map source" in n for n in good.notes + bad.notes)  # a field, not a note
    assert bad.score > good.score
    y, x = np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)
    assert 60 <= x <= 105 and 30 <= y <= 72  # the peak sits on the planted spot
    session = screener.chat(references=references)
    assert session.inspect(_texture(21, defect=True)).score == pytest.approx(bad.score)
    with pytest.raises(ValueError, match="no language model"):
        session.ask("why?")


def test_real_magnetic_tile_defect_scores_above_its_references(real_dev):
    TILES = real_dev("magnetic_tile")
    refs = sorted((TILES / "train" / "good").iterdir())[:4]
    defective = sorted((TILES / "test" / "break").iterdir())[:3]
    good = sorted((TILES / "test" / "good").iterdir())[:3]
    findings = AnomalyAssistant.expert_only().screen([*defective, *good], references=refs)
    assert all(f.image_path for f in findings)
    assert np.mean([f.score for f in findings[:3]]) > np.mean([f.score for f in findings[3:]])


def test_bad_images_raise_a_clear_error(assistant, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    for bad, reason in (
        (empty, "empty"),
        (text, "not a readable image"),
        (tmp_path / "missing.png", "no such file"),
    ):
        with pytest.raises(ImageError, match=reason):
            assistant.chat().inspect(bad)


def test_save_and_reload_the_assistant(assistant, references, tmp_path):
    assistant.save_pretrained(tmp_path)
    again = AnomalyAssistant.from_pretrained(str(tmp_path))
    image = _texture(30, defect=True)
    a = assistant.chat(references=references).inspect(image, max_new_tokens=6)
    b = again.chat(references=references).inspect(image, max_new_tokens=6)
    assert a.raw_text == b.raw_text and a.score == pytest.approx(b.score, abs=1e-6)


def test_a_checkpoints_reference_matching_settings_drive_its_screener(references, tmp_path):
    """The settings travel with the checkpoint (save -> load) and change the reference map it shows."""
    from anomaly_assistant.expert.reference import ScreenerConfig

    tiny = AnomalyAssistant.from_pretrained("tiny")
    tiny.model.config.reference_matching = {"image_size": 128, "bank": {"patch_size": 1, "blur_sigma": 0.0}}
    tiny.save_pretrained(tmp_path)
    loaded = AnomalyAssistant.from_pretrained(str(tmp_path))
    config = loaded.reference_screener(references).config
    assert config.image_size == 128 and config.bank.patch_size == 1 and config.bank.blur_sigma == 0.0
    assert config.augment == ScreenerConfig().augment  # what the checkpoint leaves out keeps its default
    image = _texture(31, defect=True)
    plain = AnomalyAssistant.from_pretrained("tiny").reference_screener(references).predict([image])[0]
    ours = loaded.reference_screener(references).predict([image])[0]
    assert ours.anomaly_map.shape == plain.anomaly_map.shape == (image.height, image.width)
    assert not np.allclose(ours.anomaly_map, plain.anomaly_map, atol=1e-3)
    with pytest.raises(ValueError, match="unknown bank setting"):
        ScreenerConfig.from_dict({"bank": {"patch": 1}})
    for bad, named in (({"image_size": 0}, "image_size"), ({"bank": {"score": "mean"}}, "score"),
                       ({"augment": ["rot90"]}, "augment"), ({"bank": {"blur_sigma": -1}}, "blur_sigma"),
                       ({"illumination": "auto"}, "illumination"),
                       ({"bank": {"patch_size": "3"}}, "patch_size")):
        with pytest.raises(ValueError, match=named):
            ScreenerConfig.from_dict(bad)
    tiny.model.config.reference_matching = {"bank": {"knn": 0}}  # a hand-edited config.json: refused at load
    tiny.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="knn"):
        AnomalyAssistant.from_pretrained(str(tmp_path / "bad"))


def test_expert_outputs_carry_the_reference_cue_only_when_given_references(assistant, references):
    """The public view of a checkpoint's expert (what research scripts study) matches the screener's cue."""
    image = _texture(41, defect=True)
    (alone,) = assistant.expert_outputs([image])
    (matched,) = assistant.expert_outputs([image], references=references)
    assert alone.reference_score is None and alone.reference_map is None
    screened = assistant.reference_screener(references).predict([image])[0]
    assert matched.reference_score == pytest.approx(screened.score, abs=1e-6)
    assert matched.reference_map.shape == alone.ltfm_map.shape
    torch.testing.assert_close(matched.ltfm_map, alone.ltfm_map)  # the LTFM does not see the references
    with pytest.raises(ValueError, match="no model expert"):
        AnomalyAssistant.expert_only().expert_outputs([image])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_checkpoints_score_views_average_the_flipped_images_ltfm_scores(references, family):
    """Each flipped view goes through the processor and the tower like the image itself (any family)."""
    viewed = AnomalyAssistant.from_pretrained(f"tiny:{family}")
    viewed.model.model.expert.mark_trained()
    plain = AnomalyAssistant(viewed.model.__class__(viewed.model.config), viewed.processor)
    plain.model.load_state_dict(viewed.model.state_dict())
    plain.model.model.expert.mark_trained()
    viewed.model.model.expert.config.score_views = ["hflip", "vflip"]
    image = _texture(43, size=(150, 110), defect=True)
    flips = [image, *(image.transpose(t) for t in (Image.Transpose.FLIP_LEFT_RIGHT,
                                                    Image.Transpose.FLIP_TOP_BOTTOM))]
    own = [float(torch.sigmoid(o.score_logit)) for o in plain.expert_outputs(flips)]
    assert max(own) - min(own) > 1e-4  # the views really differ
    (out,) = viewed.expert_outputs([image], references=references)
    assert float(out.ltfm_score) == pytest.approx(sum(own) / 3, abs=1e-5)
    finding = viewed.chat(references=references).inspect(image, max_new_tokens=4)
    w = viewed.model.model.expert.config.score_fusion
    assert finding.score == pytest.approx((1 - w) * sum(own) / 3 + w * out.reference_score, abs=1e-4)


def test_generation_never_emits_image_or_anomaly_placeholders(assistant, references, monkeypatch):
    """Placeholders in an answer would be counted as images by any later forward over it (GRPO re-scores
    completions with their images) and vanish silently from the decoded text."""
    from anomaly_assistant.backbones import ANOMALY_PAD

    tok = assistant.processor.tokenizer
    placeholders = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", ANOMALY_PAD)]
    start, generated = {}, []

    def placeholders_first(batch_id, input_ids):  # the first new token may only be a placeholder
        first = start.setdefault(batch_id, len(input_ids)) == len(input_ids)
        return placeholders if first else [tok.eos_token_id]

    generate = assistant.model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        generated.append(out[:, kwargs["input_ids"].shape[1]:])
        return out

    monkeypatch.setattr(assistant.model, "generate", recording_generate)
    finding = assistant.chat(references=references).inspect(
        _texture(9, defect=True), prefix_allowed_tokens_fn=placeholders_first, max_new_tokens=4)
    assert finding.verdict in ("normal", "anomalous")
    (new_tokens,) = generated
    assert not set(new_tokens.flatten().tolist()) & set(placeholders), new_tokens


def _forced_calls(tok, pieces):
    """prefix_allowed_tokens_fn that makes the k-th generate call write exactly pieces[k] (then stop)."""
    state = {"call": -1, "start": 0, "last": None}

    def allowed(batch_id, input_ids):
        n = len(input_ids)
        if state["last"] is None or n != state["last"] + 1:  # the first step of a new generate call
            state["call"], state["start"] = state["call"] + 1, n
        state["last"] = n
        target = tok(pieces[state["call"]], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        i = n - state["start"]
        return [target[i]] if i < len(target) else [tok.eos_token_id]

    return allowed


@pytest.mark.parametrize("threshold", [0.5, 0.99])
def test_expert_answer_fields_write_the_calibrated_verdict_and_boxes(references, threshold):
    """A checkpoint with `expert_answer_fields` answers with the expert's verdict at the session's threshold
    and the expert's boxes; the LLM's own words (here a forced 'normal') come before and after them."""
    assistant = AnomalyAssistant.from_pretrained("tiny")
    assistant.model.config.expert_answer_fields = ["verdict", "boxes"]
    image = _texture(9, defect=True)
    (screened,) = assistant.screen([image], references=references, threshold=threshold)
    said = ('<think>It looks regular.</think>\n<answer>{"verdict": "normal", "defect_type": null, '
            '"boxes": [], "rationale": "fine"}</answer>')
    forcer = _forced_calls(assistant.processor.tokenizer, [said, 'A dark spot on the surface."}</answer>'])
    finding = assistant.chat(references=references, threshold=threshold).inspect(
        image, prefix_allowed_tokens_fn=forcer, max_new_tokens=120)
    assert finding.source == "model" and finding.parse_error is None, finding.raw_text
    assert finding.verdict == screened.verdict == ("anomalous" if finding.score >= threshold else "normal")
    if finding.verdict == "anomalous":
        assert "expert's anomaly score" in finding.think  # the model's contrary reasoning is not kept
        assert finding.rationale == "A dark spot on the surface."
        assert len(finding.boxes) == len(screened.boxes) >= 1
        assert all(a.iou(b) > 0.8 for a, b in zip(finding.boxes, screened.boxes))
    else:
        assert finding.think == "It looks regular." and finding.boxes == []


@pytest.mark.parametrize("threshold", [0.05, 0.99])
def test_a_rationale_that_contradicts_the_expert_verdict_is_replaced(references, threshold):
    """The LLM's rationale concluding the opposite of the expert's verdict ("No defect is visible" under
    ANOMALOUS) is replaced by what the expert measured, so verdict and rationale never disagree."""
    from anomaly_assistant.scoring import concluded_verdict

    assistant = AnomalyAssistant.from_pretrained("tiny")
    assistant.model.config.expert_answer_fields = ["verdict", "boxes"]
    image = _texture(9, defect=True)
    (screened,) = assistant.screen([image], references=references, threshold=threshold)
    contrary = {"anomalous": "No defect is visible, the part is normal.",
                "normal": "A scratch crosses it, so the part is anomalous."}[screened.verdict]
    said = '<think>Hard to say.</think>\n<answer>{"verdict": "normal", "defect_type": null, "boxes":'
    forcer = _forced_calls(assistant.processor.tokenizer, [said, contrary + '"}</answer>'])
    finding = assistant.chat(references=references, threshold=threshold).inspect(
        image, prefix_allowed_tokens_fn=forcer, max_new_tokens=120)
    assert finding.parse_error is None and finding.verdict == screened.verdict, finding.raw_text
    assert concluded_verdict(finding.rationale) in (None, finding.verdict), finding.rationale
    assert f"expert score {finding.score:.2f}" in finding.rationale
    assert f"threshold {threshold:.2f}" in finding.rationale
    if finding.verdict == "anomalous":
        assert finding.boxes and "region at the" in finding.rationale


def test_expert_answer_fields_repair_a_malformed_answer_head(references):
    """Badly quoted or unfinished text before the boxes never reaches the parser: the head is rewritten."""
    assistant = AnomalyAssistant.from_pretrained("tiny")
    assistant.model.config.expert_answer_fields = ["verdict", "boxes"]
    rambling = ('<think>A hole.</think>\n<answer>{"verdict": "anomalous", "defect_type": "holes in the '
                "bottle', " + "',holes" * 30)
    forcer = _forced_calls(assistant.processor.tokenizer, [rambling, 'Round hole."}</answer>'])
    finding = assistant.chat(references=references, threshold=0.5).inspect(
        _texture(9, defect=True), prefix_allowed_tokens_fn=forcer, max_new_tokens=200)
    assert finding.source == "model" and finding.parse_error is None, finding.raw_text
    assert finding.verdict == "anomalous" and finding.defect_type == "holes in the bottle"
    assert finding.rationale == "Round hole." and finding.boxes


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "llava"])
def test_the_expert_written_continuation_reuses_the_first_pass_cache_with_the_same_answer(
        family, references, monkeypatch):
    """The rationale pass continues from the first pass's key/value cache (the image is not encoded again)
    and writes exactly what a pass that encodes everything again writes."""
    from anomaly_assistant import assistant as module

    assistant = AnomalyAssistant.from_pretrained(f"tiny:{family}")
    assistant.model.config.expert_answer_fields = ["verdict", "boxes"]
    tok = assistant.processor.tokenizer
    head = tok('<think>A spot.</think>\n<answer>{"verdict": "anomalous", "defect_type": "hole", "boxes": [],',
               add_special_tokens=False)["input_ids"]
    everything = list(range(len(tok)))
    calls, starts = [], {}

    def first_call_forced(batch_id, input_ids):  # the first pass writes `head`, the second is free (greedy)
        n = len(input_ids)
        if not calls or n != calls[-1] + 1:
            starts[len(starts)] = n
        calls.append(n)
        i = n - starts[0]
        return [head[i]] if len(starts) == 1 and i < len(head) else everything

    image = _texture(9, defect=True)

    def inspect():
        calls.clear(), starts.clear()
        return assistant.chat(references=references, threshold=0.0).inspect(
            image, prefix_allowed_tokens_fn=first_call_forced, max_new_tokens=len(head) + 12)

    pixels_seen = []
    generate = assistant.model.generate

    def recording_generate(**kwargs):
        pixels_seen.append("pixel_values" in kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(assistant.model, "generate", recording_generate)
    reused = inspect()
    assert pixels_seen == [True, False], pixels_seen  # the continuation got the cache, not the image
    monkeypatch.setattr(module._CachedPrompt, "reusable_for", lambda self, ids: None)
    pixels_seen.clear()
    encoded_again = inspect()
    assert pixels_seen == [True, True]
    assert reused.raw_text == encoded_again.raw_text and '"rationale": "' in reused.raw_text


def test_references_that_do_not_show_the_part_are_named_in_the_finding():
    """Screening a part against good images of another part warns in the Finding's notes; against its own
    references it does not, defective or not."""
    from anomaly_assistant.data_builders.synth_inspect import render
    from anomaly_assistant.resources import sample_images, sample_references

    expert = AnomalyAssistant.expert_only()
    own = expert.screen(sample_images(), references=sample_references())
    assert not any("do not look like" in n for f in own for n in f.notes), [f.notes for f in own]
    grid = [Image.fromarray(render("grid", 100 + k, 7, 128, anomalous=False).image) for k in range(4)]
    bottle = Image.fromarray(render("bottle", 0, 7, 128, anomalous=False).image)
    (other,) = expert.screen([bottle], references=grid)
    (note,) = [n for n in other.notes if "do not look like" in n]
    assert "use good images of this same part" in note
