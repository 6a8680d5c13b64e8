"""The inspector's workbench: gradio UI, HTTP API, inspection records (as anomaly_assistant.serve)."""
