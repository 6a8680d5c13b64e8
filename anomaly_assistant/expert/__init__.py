"""The anomaly expert: pure torch (no transformers or trainer imports), typed output, self-persisting.

- `config.ExpertConfig`: sizes and constants (JSON-serialisable, carried inside the HF model config).
- `ltfm.LTFM`: Anomaly-OV's look-twice feature matching -> level maps, map m, significance σ.
- `selector.VTSelector` / `ScoreHead` / `TokenProjector`: K = 1 + g² tokens in v° space, image score, LLM
  projector.
- `model.AnomalyExpert` -> `ExpertOutput`; fuses the training-free reference bank of `reference.py`.
- `losses`: stage-1 objectives (balanced BCE; focal + dice where masks exist).
- `sources` (feature sources) and `reference` (memory bank, screener) are imported from their modules
  directly.
"""

from .config import LEVEL_WORDS, ExpertConfig
from .losses import balanced_bce, dice_loss, focal_loss, resize_mask, stage1_loss
from .model import AnomalyExpert, ExpertOutput, ReferenceMatch, level_word, match_reference

__all__ = [
    "LEVEL_WORDS",
    "AnomalyExpert",
    "ExpertConfig",
    "ExpertOutput",
    "ReferenceMatch",
    "balanced_bce",
    "dice_loss",
    "focal_loss",
    "level_word",
    "match_reference",
    "resize_mask",
    "stage1_loss",
]
