"""Data builders: dataset readers, SynthInspect, defect synthesis, conversations and exports for TRL.

Readers (`sources`) return `records.Record` lists; `build.build(BuildConfig)` runs the whole pipeline that
`anomaly-assistant data build` wraps. Heavy imports (datasets, transformers) happen only where needed.
"""
