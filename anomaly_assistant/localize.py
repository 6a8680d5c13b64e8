"""From an anomaly map to boxes: threshold, connected components (scikit-image), one box per region."""

from __future__ import annotations

import numpy as np
from skimage.measure import label, regionprops

from .finding import Box


def boxes_from_map(
    anomaly_map: np.ndarray, threshold: float = 0.5, min_area_frac: float = 1e-4, max_boxes: int = 10,
    label_text: str | None = None,
) -> list[Box]:
    """Boxes around the connected regions where `anomaly_map >= threshold`, largest-peak first.

    Coordinates are in the map's pixel frame (the original image when the map is at original size);
    regions smaller than `min_area_frac` of the image are dropped as speckle.
    """
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0)
    if amap.ndim != 2 or amap.size == 0:
        return []
    regions = regionprops(label(amap >= threshold, connectivity=2), intensity_image=amap)
    min_area = max(1.0, min_area_frac * amap.size)
    kept = [r for r in regions if r.area >= min_area]
    kept.sort(key=lambda r: float(r.intensity_max), reverse=True)
    boxes = []
    for r in kept[:max_boxes]:
        y1, x1, y2, x2 = r.bbox  # half-open, like our boxes
        boxes.append(Box(float(x1), float(y1), float(x2), float(y2), label_text, round(float(r.intensity_max), 4)))
    return boxes
