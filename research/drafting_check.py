"""Does drafting from the training answers change what the default model says, and how much faster is it?

    python research/drafting_check.py [--per-category 2] [--seed 7919] [--followups 6]

Held-out SynthInspect images (`default_model_quality.synth_items`: seed 7919, never trained on, 4 references
each) are inspected twice by the same loaded default model, in alternating order: with its `lookup` corpus
(what the product does) and with it switched off (one token per forward); then one follow-up question each on
some anomalous ones. Prints the share of identical answers, every difference, and the median seconds of both.
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7919, help="held-out SynthInspect seed (never 0)")
    parser.add_argument("--per-category", type=int, default=2, help="held-out images per category")
    parser.add_argument("--followups", type=int, default=6, help="anomalous images asked one follow-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from default_model_quality import synth_items

    from anomaly_assistant import AnomalyAssistant

    torch.set_num_threads(args.threads)
    assistant = AnomalyAssistant.from_pretrained()
    corpus = assistant.model.lookup_corpus
    if corpus is None:
        parser.error("the default model has no lookup corpus: nothing to compare")

    seconds: dict[str, list[float]] = {"drafting": [], "plain": []}
    same, differences, asked = 0, [], 0
    items = synth_items(args.seed, 128, args.per_category)
    for i, it in enumerate(items):
        follow = it["label"] == 1 and asked < args.followups
        asked += int(follow)
        texts = {}
        for mode in (("drafting", "plain") if i % 2 == 0 else ("plain", "drafting")):
            assistant.model.lookup_corpus = corpus if mode == "drafting" else None
            session = assistant.chat(references=it["refs"])
            started = time.perf_counter()
            finding = session.inspect(it["image"])
            seconds[mode].append(time.perf_counter() - started)  # the inspection only
            texts[mode] = (finding.raw_text, session.ask("What could have caused it?") if follow else None)
        if texts["drafting"] == texts["plain"]:
            same += 1
        else:
            differences.append((it["category"], it["index"], texts["drafting"], texts["plain"]))
    assistant.model.lookup_corpus = corpus
    drafted, plain = statistics.median(seconds["drafting"]), statistics.median(seconds["plain"])
    print(f"{len(items)} held-out images (seed {args.seed}), {asked} with a follow-up: identical answers "
          f"{same} / {len(items)}")
    print(f"median seconds per inspection: drafting {drafted:.2f}, plain {plain:.2f} "
          f"(plain / drafting {plain / drafted:.2f})")
    for category, index, with_drafts, without in differences:
        print(f"\n{category} #{index}\n  drafting: {with_drafts}\n  plain:    {without}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
