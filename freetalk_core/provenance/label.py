"""The visible label: a short text in a dark box in the bottom-left corner, sized to the frame."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator

import cv2
import numpy as np


@lru_cache(maxsize=4)
def _layout(text: str, height: int, width: int) -> tuple[float, int, tuple[int, int], tuple[int, int, int, int]]:
    """(font scale, thickness, text origin, box x0 y0 x1 y1): text height about 3.5% of the
    shorter side (at least 10 px), shrunk to fit 90% of the width."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    target = max(10.0, 0.035 * min(height, width))
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(target / max(th, 1), 0.9 * width / max(tw, 1))
    thickness = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    pad = max(2, th // 2)
    x0, y1 = pad, height - pad
    box = (x0, max(0, y1 - th - base - 2 * pad), min(width, x0 + tw + 2 * pad), y1)
    return scale, thickness, (x0 + pad, y1 - pad - base), box


def draw_label(frame: np.ndarray, text: str) -> np.ndarray:
    """`(H, W, 3) uint8` RGB frame with `text` drawn in white on a translucent dark box."""
    scale, thickness, origin, (x0, y0, x1, y1) = _layout(text, frame.shape[0], frame.shape[1])
    out = frame.copy()
    out[y0:y1, x0:x1] = (out[y0:y1, x0:x1].astype(np.uint16) * 2 // 5).astype(np.uint8)
    cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def label_frames(frames: Iterable[np.ndarray], text: str) -> Iterator[np.ndarray]:
    for frame in frames:
        yield draw_label(frame, text)
