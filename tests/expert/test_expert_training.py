"""Stage-1 expert training on a tiny SynthInspect export: the loss falls; checkpoints save, reload, resume."""

import json

import datasets
import pytest
import torch

from anomaly_assistant.data_builders.export import expert_dataset
from anomaly_assistant.data_builders.synth_inspect import SynthInspect
from anomaly_assistant.expert.fitted import build_source, efficientnet_expert_config
from anomaly_assistant.expert.losses import stage1_loss
from anomaly_assistant.expert.model import AnomalyExpert
from anomaly_assistant.train.expert import ExpertStageConfig, make_samples, run, train_expert, validate

SIZE = 64  # SynthInspect side and feature-source input: 8x8 / 4x4 level grids keep the test fast


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    recs = SynthInspect(size=SIZE, categories=("bottle", "woven"), seed=3).write_mvtec(
        root / "img", 0, 0, total=16
    )
    assert {r.gt_label for r in recs} == {0, 1} and any(r.gt_mask for r in recs)
    datasets.DatasetDict(
        {"train": expert_dataset(recs[:10]), "validation": expert_dataset(recs[10:])}
    ).save_to_disk(str(root / "expert"))
    return root


def _batch_loss(expert, samples):
    with torch.no_grad():
        outs = expert.forward_batch([s.levels for s in samples], [s.v0 for s in samples], use_ltfm=True)
        return float(stage1_loss(outs, [s.label for s in samples], [s.mask for s in samples])["loss"])


def test_training_lowers_the_stage1_loss(export):
    ds = datasets.load_from_disk(str(export / "expert"))["train"]
    torch.manual_seed(0)
    expert = AnomalyExpert(efficientnet_expert_config(source_options={"image_size": SIZE}))
    samples = make_samples(
        build_source(expert.config), list(ds["image"]), ds["gt_label"], list(ds["mask"]), "flatfield"
    )
    assert samples[0].v0.shape[-1] == expert.config.token_dim and any(
        s.mask is not None and s.mask.any() for s in samples
    )
    before = _batch_loss(expert, samples)
    res = train_expert(expert, samples, steps=20, batch_size=8, learning_rate=3e-3, seed=0)
    after = _batch_loss(expert, samples)
    assert res["steps"] == 20 and after < 0.8 * before, (before, after)
    # and it learnt something beyond the loss: defects score above normals on the images it saw
    assert validate(expert, samples)["image_auroc"] > 0.8


def test_run_saves_reloads_resumes_and_ablates_the_mask_loss(export, tmp_path):
    base = {"data": str(export), "image_size": SIZE, "batch_size": 8, "progress": False, "embed_dim": 16}
    final = run(ExpertStageConfig(**base, output_dir=str(tmp_path / "a"), epochs=2, save_total_limit=1))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-epoch-2"]
    assert all(r["val_image_auroc"] is not None and r["val_pixel_auroc"] is not None for r in rows), rows
    trained = AnomalyExpert.from_pretrained(final)
    assert trained.is_trained
    # reload: identical maps
    ds = datasets.load_from_disk(str(export / "expert"))["validation"]
    samples = make_samples(
        build_source(trained.config),
        list(ds["image"])[:3],
        ds["gt_label"][:3],
        list(ds["mask"])[:3],
        "flatfield",
    )
    again = AnomalyExpert.from_pretrained(final)
    a = trained.forward_batch([s.levels for s in samples], [s.v0 for s in samples])
    b = again.forward_batch([s.levels for s in samples], [s.v0 for s in samples])
    assert all(torch.equal(x.anomaly_map, y.anomaly_map) and x.map_source == "ltfm" for x, y in zip(a, b))
    # resume: one epoch, then a resumed second epoch ends with the same weights as the straight run
    run(ExpertStageConfig(**base, output_dir=str(tmp_path / "b"), epochs=1))
    resumed = run(ExpertStageConfig(**base, output_dir=str(tmp_path / "b"), epochs=2, resume=True))
    sa = trained.state_dict()
    sb = AnomalyExpert.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert rows[0]["dice"] > 0.0


def test_cli_train_expert(export, tmp_path):
    from anomaly_assistant.cli import main

    out = tmp_path / "cli"
    argv = ["train", "expert", "--data", str(export), "--output-dir", str(out), "--epochs", "1"]
    flags = [
        "--image-size",
        str(SIZE),
        "--batch-size",
        "8",
        "--no-progress",
        "--embed-dim",
        "8",
        "--no-mask-loss",
    ]
    assert main([*argv, *flags]) == 0
    assert AnomalyExpert.from_pretrained(out / "expert").is_trained
    # without the mask loss the focal / dice terms are never optimised (logged as 0)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["focal"] == 0.0 and row["dice"] == 0.0
    assert main([*argv, "--epochs", "0"]) == 2  # a config that cannot work is a usage error


def test_the_expert_inside_a_chat_model_trains_on_what_inference_feeds_it(export):
    """`samples_in_model` gives the expert the chat model's own inputs; `adapt_in_model` lowers its loss
    there."""
    from anomaly_assistant.modeling import tiny_anomaly_model
    from anomaly_assistant.prompts import INSPECTION_PROMPT
    from anomaly_assistant.train.expert import adapt_in_model, samples_in_model

    model, processor = tiny_anomaly_model("llava", feature_source="efficientnet_lite0")
    ds = datasets.load_from_disk(str(export / "expert"))["validation"]
    images = list(ds["image"])
    samples = samples_in_model(model, processor, images, ds["gt_label"], list(ds["mask"]), batch=4)
    assert len(samples) == len(images) and any(s.mask is not None and s.mask.any() for s in samples)
    # the same expert outputs as a real forward of the model on one image
    conversation = [{"role": "user",
                     "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[images[0]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        _, (out,) = model.run_expert(inputs)
        (again,) = model.model.expert.forward_batch([samples[0].levels], [samples[0].v0])
    assert torch.allclose(out.score_logit, again.score_logit, atol=1e-5)
    before = _batch_loss(model.model.expert.float(), samples)
    report = adapt_in_model(model, processor, str(export), epochs=4, batch_size=4, learning_rate=3e-3)
    assert report["steps"] == 4 * 3 and report["train_rows"] == 10  # ceil(10 / 4) steps per epoch
    assert {"val_image_auroc_before", "val_image_auroc_after"} <= set(report)
    assert model.model.expert.is_trained
    after = _batch_loss(model.model.expert, samples)
    assert after < before, (before, after)
