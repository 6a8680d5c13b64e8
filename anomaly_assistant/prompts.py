"""The fixed questions the product asks.

Training data, GRPO prompts, the assistant and evaluation import them from here, so what the model is trained
on is exactly what it is asked.
"""

# The inspection turn; its answer follows the grammar in `grammar.py`.
INSPECTION_PROMPT = (
    "Inspect this image for defects. Reason briefly inside <think></think>, "
    "then answer inside <answer></answer> with JSON keys verdict (normal or anomalous), "
    "defect_type, boxes ([x1, y1, x2, y2] in pixels) and rationale."
)

# VisA-D&R's detection question; a reply containing "yes" counts as anomalous.
DETECTION_PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."
