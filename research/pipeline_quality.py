"""Does training move the needle? A pipeline folder measured on a SynthInspect split it never saw.

    python research/pipeline_quality.py runs/pipeline-quality --seed 7919 --images 40

Builds a test set with `data build` from a seed the pipeline's data never used (its images, defects and
positions differ; the build's largest split, `train`, 80 % of its images, is the one measured), in the
pipeline's image size and box frame, then measures on it, through the product's `inspect_batch` (greedy, no
reference images):

- the untrained chat model (`DIR/start`: the tiny backbone with the stage-1 expert, before SFT),
  after SFT (`DIR/sft/final`) and after GRPO (`DIR`): parse rate and verdict F1 (`train.pipeline.measure`);
- the mean total GRPO reward of SFT and of GRPO (the rewards and weights of the pipeline's GRPO stage, on
  the answers above, as `train.pipeline.measure` scores them), and GRPO's gain over SFT on the same
  images with its 95 % bootstrap interval (`train.rewards.paired_gain`): a gain is measured when the
  interval stays above 0.

`--grpo FOLDER` measures another GRPO run from the pipeline's SFT model (`train grpo --model DIR/sft/final`)
in place of the pipeline's own. Prints one table and writes `DIR/heldout-seed<SEED>-n<IMAGES>[-<run>].json`.
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
    parser.add_argument("--grpo", type=Path, default=None,
                        help="a `train grpo` folder (or its `final`) measured instead of the pipeline's GRPO")
    args = parser.parse_args(argv)

    import datasets

    from anomaly_assistant.data_builders.build import BuildConfig, build
    from anomaly_assistant.train.pipeline import CONFIG_NAME, measure
    from anomaly_assistant.train.rewards import RewardConfig, paired_gain

    root = Path(args.pipeline_dir)
    config = json.loads((root / CONFIG_NAME).read_text())
    if args.seed == config["data"]["seed"]:
        parser.error(f"--seed {args.seed} is the seed the pipeline trained on")
    rewards = RewardConfig(**config["grpo"]["rewards"])
    held_out = root / f"heldout-seed{args.seed}-n{args.images}"
    if not (held_out / "summary.json").is_file():
        datasets.disable_progress_bars()
        kinds = config["data"]["kinds"]
        build(BuildConfig(out=str(held_out), synth=args.images, synth_size=config["data"]["synth_size"],
                          processor=str(root / "start"), backbone=json.loads(
                              (root / "config.json").read_text())["model_type"].removeprefix("anomaly_"),
                          seed=args.seed, progress=False,
                          **({"kinds": kinds} if kinds else {})))
    grpo = root
    if args.grpo is not None:
        grpo = args.grpo / "final" if (args.grpo / "final").is_dir() else args.grpo
        if not (grpo / "config.json").is_file():
            parser.error(f"--grpo {args.grpo}: no model there (config.json)")
    models = {"untrained": root / "start", "sft": root / "sft" / "final", "grpo": grpo}
    result: dict = {"pipeline": str(root), "grpo": str(grpo), "seed": args.seed, "measure": {}}
    for name, folder in models.items():
        result["measure"][name] = measure(str(folder), str(held_out), SPLIT, 0, args.max_new_tokens,
                                          rewards=rewards)
    print(f"held-out SynthInspect split, seed {args.seed}: {result['measure']['sft']['n']} images "
          f"({result['measure']['sft']['anomalous']} anomalous)")
    print(f"{'model':10} {'parse':>6} {'ansF1':>6} {'prodF1':>6} {'acc':>6} {'reward':>7}")
    for name, q in result["measure"].items():
        print(f"{name:10} {q['parse_rate']:6.3f} {q['answer_f1']:6.3f} {q['product_f1']:6.3f} "
              f"{q['answer_accuracy']:6.3f} {q['reward']:7.3f}")
    before, after = (result["measure"][k] for k in ("sft", "grpo"))
    gain = result["gain"] = paired_gain(before["reward_totals"], after["reward_totals"])
    print(f"mean total GRPO reward: SFT {before['reward']:.4f} -> GRPO {after['reward']:.4f} "
          f"(gain {gain['gain']:+.4f}, 95 % interval {gain['low']:+.4f} .. {gain['high']:+.4f}, "
          f"{gain['n']} images)")
    terms = [k for k, v in before["rewards"].items() if v is not None]
    print("per term, SFT -> GRPO: " + ", ".join(f"{k} {before['rewards'][k]:.3f} -> {after['rewards'][k]:.3f}"
                                                for k in terms))
    tag = f"-{args.grpo.name}" if args.grpo is not None else ""
    out = root / f"heldout-seed{args.seed}-n{args.images}{tag}.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
