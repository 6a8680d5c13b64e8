"""Evaluation: anomaly detection (`ad`), yes/no detection, reasoning dialogues, MMAD and the speed benchmark.

Each protocol module loads its data, runs the assistant (spread over launched processes by `distributed`),
computes its metrics and writes a Markdown / HTML report; `cli` holds the thin entry points.
"""
