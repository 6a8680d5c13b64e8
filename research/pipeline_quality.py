"""Does training move the needle? A pipeline folder measured on a SynthInspect split it never saw.

    python research/pipeline_quality.py runs/pipeline-quality --seed 7919 --images 40

Builds a test set with `data build` from a seed the pipeline's data never used (its images, defects and
positions differ; the build's largest split, `train`, 80 % of its images, is the one measured), in the
pipeline's image size and box frame, then measures on it, through the product's `inspect_batch` (greedy, no
reference images):

- the untrained chat model (`DIR/start`: the tiny backbone with the stage-1 expert, before SFT),
  after SFT (`DIR/sft/final`) and after GRPO (`DIR`): parse rate and verdict F1 (`train.pipeline.measure`);
- the mean total GRPO reward of SFT and of GRPO (`train.grpo.held_out_reward`, the rewards and weights of
  the pipeline's GRPO stage).

Prints one table and writes `DIR/heldout-seed<SEED>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPLIT = "train"  # of the held-out build: every image in it is unseen by the pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline_dir", help="an `anomaly-assistant train pipeline` output folder")
    parser.add_argument("--seed", type=int, default=7919, help="seed of the held-out SynthInspect images")
    parser.add_argument("--images", type=int, default=40, help="held-out images (half anomalous)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    import datasets

    from anomaly_assistant.data_builders.build import BuildConfig, build
    from anomaly_assistant.train.grpo import held_out_reward
    from anomaly_assistant.train.pipeline import CONFIG_NAME, measure
    from anomaly_assistant.train.rewards import RewardConfig

    root = Path(args.pipeline_dir)
    config = json.loads((root / CONFIG_NAME).read_text())
    if args.seed == config["data"]["seed"]:
        parser.error(f"--seed {args.seed} is the seed the pipeline trained on")
    rewards = RewardConfig(**config["grpo"]["rewards"])
    held_out = root / f"heldout-seed{args.seed}"
    if not (held_out / "summary.json").is_file():
        datasets.disable_progress_bars()
        kinds = config["data"]["kinds"]
        build(BuildConfig(out=str(held_out), synth=args.images, synth_size=config["data"]["synth_size"],
                          processor=str(root / "start"), backbone=json.loads(
                              (root / "config.json").read_text())["model_type"].removeprefix("anomaly_"),
                          seed=args.seed, progress=False,
                          **({"kinds": kinds} if kinds else {})))
    models = {"untrained": root / "start", "sft": root / "sft" / "final", "grpo": root}
    result: dict = {"pipeline": str(root), "seed": args.seed, "measure": {}, "held_out_reward": {}}
    for name, folder in models.items():
        result["measure"][name] = measure(str(folder), str(held_out), SPLIT, 0, args.max_new_tokens,
                                          rewards=rewards)
    for name in ("sft", "grpo"):
        result["held_out_reward"][name] = held_out_reward(str(models[name]), str(held_out), rewards, SPLIT,
                                                          max_new_tokens=args.max_new_tokens, device="cpu")
    print(f"held-out SynthInspect split, seed {args.seed}: {result['measure']['sft']['n']} images "
          f"({result['measure']['sft']['anomalous']} anomalous)")
    print(f"{'model':10} {'parse':>6} {'ansF1':>6} {'prodF1':>6} {'acc':>6} {'reward':>7}")
    for name, q in result["measure"].items():
        print(f"{name:10} {q['parse_rate']:6.3f} {q['answer_f1']:6.3f} {q['product_f1']:6.3f} "
              f"{q['answer_accuracy']:6.3f} {q['reward']:7.3f}")
    sft, grpo = (result["held_out_reward"][k]["reward"] for k in ("sft", "grpo"))
    print(f"held_out_reward (mean total GRPO reward): SFT {sft:.4f} -> GRPO {grpo:.4f} ({grpo - sft:+.4f})")
    (root / f"heldout-seed{args.seed}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
