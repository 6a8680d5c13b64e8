"""The eval / bench commands end to end through AnomalyAssistant: stable JSON keys, reports,
2 processes == 1."""

import json
import os
import subprocess
import sys

import pytest

from anomaly_assistant.cli import main as cli_main

AD_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pro", "n_images", "n_masks", "seconds")
DETECT_KEYS = ("accuracy", "precision", "recall", "f1", "n_images", "seconds", "per_class")
BENCH_KEYS = ("screening_img_per_s", "screening_busy_over_idle", "matching_over_extraction",
              "expert_latency_ratio", "expert_latency_ratio_no_references", "tokens_per_s", "peak_rss_mb")


def _json(path):
    return json.loads(path.read_text())


def test_help_on_every_subcommand(capsys):
    assert cli_main(["eval", "--help"]) == 0
    for argv in (["eval", "ad"], ["eval", "detect"], ["eval", "reasoning"], ["eval", "mmad"], ["bench"]):
        with pytest.raises(SystemExit) as exc:
            cli_main([*argv, "--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--expert-only" in out and "--judge-endpoint" in out and "--real-widths" in out
    assert cli_main(["eval", "ad", "--data", "x"]) == 2  # missing --out / --category


AD_ARGS = ["--category", "brick", "--shots", "3", "--expert-only", "--batch-size", "2"]


@pytest.fixture(scope="module")
def ad_one(mvtec_root, tmp_path_factory):
    """`eval ad --expert-only` in this process, one thread (as each process of the 2-process run)."""
    import torch

    out = tmp_path_factory.mktemp("ad") / "one.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["eval", "ad", "--data", str(mvtec_root), *AD_ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_eval_ad_reference_seed_draws_the_references_it_reports(ad_one, mvtec_root, tmp_path):
    from anomaly_assistant.eval import ad

    out = tmp_path / "seeded.json"
    assert cli_main([
        "eval", "ad", "--data", str(mvtec_root), *AD_ARGS,
        "--reference-seed", "3", "--limit", "4", "--out", str(out),
    ]) == 0
    res = _json(out)
    assert res["reference_seed"] == 3
    assert res["references"] == ad.reference_paths(mvtec_root, "brick", 3, seed=3)
    assert res["references"] != _json(ad_one)["references"]  # seed 3 does not draw the first three
    assert "seed 3" in (tmp_path / "seeded.md").read_text()


def test_eval_ad_expert_only_writes_keys_and_report(ad_one):
    res = _json(ad_one)
    assert all(k in res for k in AD_KEYS)
    assert (res["n_images"], res["n_masks"]) == (8, 4)
    # Dark strokes on a brick texture against 3 normal crops: the expert must find them.
    assert res["image_auroc"] >= 0.9 and res["pixel_auroc"] >= 0.9 and 0.5 < res["pro"] <= 1.0
    assert res["mode"].startswith("expert-only") and len(res["references"]) == 3
    assert res["reference_seed"] is None
    d = ad_one.parent
    assert (d / "one.md").is_file() and (d / "one.html").is_file()
    assert (d / "one_figures" / "examples.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (d / "one_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(0.0 <= r["score"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_two_process_ad_equals_one_process(mvtec_root, ad_one, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "29519", "-m", "anomaly_assistant.cli", "eval", "ad", "--data",
                    str(mvtec_root), *AD_ARGS, "--out", str(tmp_path / "two.json")],
                   check=True, env=env, timeout=600, capture_output=True)
    one, two = _json(ad_one), _json(tmp_path / "two.json")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for key in (*AD_KEYS[:-1], "at_threshold", "per_defect"):
        assert one[key] == two[key], key
    scores = [[json.loads(x)["score"] for x in p.read_text().splitlines()]
              for p in (ad_one.parent / "one_predictions.jsonl", tmp_path / "two_predictions.jsonl")]
    assert scores[0] == scores[1]


def test_eval_detect_with_tiny_model(mvtec_root, tmp_path):
    out = tmp_path / "det.json"
    assert cli_main(["eval", "detect", "--data", str(mvtec_root), "--model", "tiny", "--max-new-tokens", "4",
                     "--limit", "4", "--out", str(out)]) == 0
    res = _json(out)
    assert all(k in res for k in DETECT_KEYS) and res["n_images"] == 4 and list(res["per_class"]) == ["brick"]
    rows = [json.loads(line) for line in (tmp_path / "det_predictions.jsonl").read_text().splitlines()]
    assert all(r["pred_label"] == int("yes" in r["reply"].lower()) for r in rows)
    assert res["accuracy"] == res["per_class"]["brick"]["accuracy"]


def test_eval_detect_expert_only_uses_the_verdict(mvtec_root, tmp_path):
    out = tmp_path / "det.json"
    assert cli_main(["eval", "detect", "--data", str(mvtec_root), "--expert-only", "--references", "3",
                     "--limit", "4", "--out", str(out)]) == 0
    res = _json(out)
    assert res["n_images"] == 4 and res["image_auroc"] >= 0.9 and res["accuracy"] >= 0.75


def test_eval_reasoning_and_mmad_with_tiny_model(mvtec_root, tmp_path):
    dialogue = [{"from": "human", "value": "<image>\nDescribe the defect and where it is."},
                {"from": "gpt", "value": "A dark scratch crosses the bricks."},
                {"from": "human", "value": "What could have caused it?"},
                {"from": "gpt", "value": "Scraping during handling."}]
    items = [
        {
            "id": str(i),
            "image": f"brick/test/scratch/{i:03d}.png",
            "metadata": {"anomaly": True, "class": "brick"},
            "conversations": dialogue,
        }
        for i in range(2)
    ]
    (mvtec_root / "dr.json").write_text(json.dumps(items))
    out = tmp_path / "rs.json"
    assert cli_main(["eval", "reasoning", "--data", str(mvtec_root / "dr.json"), "--model", "tiny",
                     "--max-new-tokens", "6", "--out", str(out)]) == 0
    res = _json(out)
    assert res["n_dialogues"] == 2 and res["low_level"]["n_turns"] == 2 and res["complex"]["n_turns"] == 2
    assert 0.0 <= res["low_level"]["sbert"] <= 1.0
    assert res["judge"] is None and res["low_level"]["judge_score"] is None

    mmad = {
        f"brick/test/scratch/{i:03d}.png": {
            "image_path": f"brick/test/scratch/{i:03d}.png",
            "similar_templates": ["brick/train/good/000.png"],
            "conversation": [
                {
                    "Question": "Is there any defect in the object?",
                    "Answer": "A",
                    "Options": {"A": "Yes.", "B": "No."},
                    "type": "Anomaly Detection",
                },
                {
                    "Question": "What is the defect?",
                    "Answer": "B",
                    "Options": {"A": "Stain.", "B": "Scratch.", "C": "Hole."},
                    "type": "Defect Classification",
                },
            ],
        }
        for i in range(2)
    }
    (mvtec_root / "mmad.json").write_text(json.dumps(mmad))
    out = tmp_path / "mm.json"
    assert cli_main(["eval", "mmad", "--data", str(mvtec_root / "mmad.json"), "--model", "tiny",
                     "--template", "similar", "--max-new-tokens", "3", "--out", str(out)]) == 0
    res = _json(out)
    assert res["n_questions"] == 4 and set(res["per_type"]) == {"Anomaly Detection", "Defect Classification"}
    assert (res["template"], res["references"]) == ("similar", 1) and set(res["per_dataset"]) == {"brick"}
    assert (tmp_path / "mm.html").is_file()


def test_bench_keys_tiny(tmp_path):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--out", str(out), "--images", "2", "--repeats", "3", "--inspections", "1",
                     "--new-tokens", "4", "--no-expert-fit"]) == 0
    res = _json(out)
    assert all(k in res and res[k] > 0 for k in BENCH_KEYS) and "expert_fit" not in res
    passes = res["screening"]["passes"]  # the reported pass is the median of the three
    assert len(passes) == 3 and res["screening"]["seconds"] == sorted(p["seconds"] for p in passes)[1]
    busy = res["screening"]["busy_passes_s"]  # the same passes beside a CPU-bound competitor
    assert len(busy) == 3 and res["screening_busy_over_idle"] == pytest.approx(
        res["screening"]["seconds"] / sorted(busy)[1])
    assert res["screening_img_per_s"] == pytest.approx(2 / res["screening"]["seconds"])
    assert res["inspection"]["new_tokens"] == 4 and res["inspection"]["model"]["real_widths"] is False
    assert (tmp_path / "bench_figures" / "times.png").is_file()


def test_eval_ad_with_tiny_model_uses_the_assistants_maps(mvtec_root, tmp_path):
    out = tmp_path / "ad.json"
    assert cli_main([
        "eval", "ad", "--data", str(mvtec_root), "--category", "brick", "--shots", "2", "--model", "tiny",
        "--limit", "4", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out),
    ]) == 0
    res = _json(out)
    assert all(k in res for k in AD_KEYS) and res["mode"] == "assistant (tiny)"
    assert (res["n_images"], res["n_masks"]) == (4, 2) and res["pixel_auroc"] is not None


def test_eval_threshold_sets_the_operating_point(ad_one, mvtec_root, tmp_path, capsys):
    """Calibrated scores are >= 0: at --threshold 0 every image is flagged; the result names its threshold."""
    assert _json(ad_one)["threshold"] == 0.5
    out = tmp_path / "zero.json"
    assert cli_main(["eval", "ad", "--data", str(mvtec_root), *AD_ARGS, "--threshold", "0", "--limit", "4",
                     "--out", str(out)]) == 0
    res = _json(out)
    at = res["at_threshold"]
    assert res["threshold"] == 0.0 and at["tn"] == at["fn"] == 0
    assert at["tp"] + at["fp"] == res["n_images"] == 4
    assert "At the operating threshold 0 (the verdict)" in (tmp_path / "zero.md").read_text()
    capsys.readouterr()
    assert cli_main(["eval", "detect", "--data", str(mvtec_root), "--expert-only", "--threshold", "1.5",
                     "--out", str(tmp_path / "bad.json")]) == 2
    assert "threshold must be a calibrated score in [0, 1], got 1.5" in capsys.readouterr().err
