"""Training: stage 1 expert, few-shot fitting, SFT and GRPO (installed as anomaly_assistant.train)."""
