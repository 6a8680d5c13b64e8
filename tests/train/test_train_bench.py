"""`anomaly-assistant train bench`: SFT and GRPO step times of one tiny backbone with and without expert."""

import json
from statistics import median

from anomaly_assistant import cli


def test_bench_times_both_paths_of_both_stages_in_one_run(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["train", "bench", "--out", str(out), "--steps", "2", "--warmup", "1", "--rounds", "2",
                   "--image-size", "56", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads((out / "train_bench.json").read_text())
    for stage in ("sft", "grpo"):
        runs = result[stage]
        assert [len(r) for r in runs["steps_with_s"]] == [len(r) for r in runs["steps_without_s"]] == [2, 2]
        # each round compares the two adjacent runs; the figure is the median of those round ratios
        rounds = [median(w) / median(wo) for w, wo in zip(runs["steps_with_s"], runs["steps_without_s"])]
        assert runs["round_ratios"] == rounds and all(r > 0 for r in rounds)
        assert abs(result[f"{stage}_step_ratio"] - median(rounds)) < 1e-12
        fastest = min(min(r) for r in runs["steps_with_s"]) / min(min(r) for r in runs["steps_without_s"])
        assert abs(result[f"{stage}_fastest_ratio"] - fastest) < 1e-12
    assert result["model"]["expert_parameters"] > 0 and result["model"]["anomaly_tokens"] > 0
    assert min(m["peak_rss_mb"] for m in result["memory"].values()) > 0
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith('{"')))
    assert set(summary) >= {"sft_step_ratio", "grpo_step_ratio", "sft_fastest_ratio", "peak_rss_mb"}
