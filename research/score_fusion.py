"""Which reference weight should the default model's fused image score use? Measured on a validation seed.

    python research/score_fusion.py ~/.cache/anomaly-assistant/default-model-* --seed 4242

For the held-out SynthInspect items of `default_model_quality.py` (seed 4242: neither trained nor tested on),
runs the model's expert once per image with its 4 references (as an inspection does) and prints, for each
weight w, detection F1 / accuracy at the 0.5 threshold and image AUROC of (1 - w) * LTFM score + w * reference
score, next to each score alone. `train export-default --score-fusion` takes the chosen weight.
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split
import argparse
import sys
from pathlib import Path

WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="an assembled default-model folder")
    parser.add_argument("--seed", type=int, default=4242, help="validation SynthInspect seed")
    parser.add_argument("--per-category", type=int, default=6, help="images per category")
    parser.add_argument("--size", type=int, default=128, help="image side (the training size)")
    args = parser.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from anomaly_assistant import AnomalyAssistant, scoring

    sys.path.insert(0, str(Path(__file__).parent))
    from default_model_quality import synth_items

    assistant = AnomalyAssistant.from_pretrained(str(args.model_dir))
    labels, ltfm, reference = [], [], []
    items = sorted(synth_items(args.seed, args.size, args.per_category), key=lambda it: it["category"])
    for item in items:  # by category: the assistant keeps a few fitted screeners, not one per category
        image = item["image"]
        (out,) = assistant.expert_outputs([image], references=item["refs"])
        labels.append(item["label"])
        ltfm.append(float(out.ltfm_score))
        reference.append(float(out.reference_score))
    print(f"seed {args.seed}, {len(labels)} images ({sum(labels)} anomalous); image AUROC: LTFM "
          f"{roc_auc_score(labels, ltfm):.3f}, reference {roc_auc_score(labels, reference):.3f}")
    print("weight  F1     accuracy  AUROC")
    for w in WEIGHTS:
        fused = [(1 - w) * a + w * b for a, b in zip(ltfm, reference)]
        m = scoring.binary_metrics(labels, [int(s >= 0.5) for s in fused])
        print(f"{w:<7} {m['f1']:.3f}  {m['accuracy']:.3f}     {roc_auc_score(labels, fused):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
