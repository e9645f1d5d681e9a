"""Optical flow of the mouth region (METHOD.md step 7).

Dense flow between consecutive frames, for the generated crops (`g`) and for the reference
motion (`r`: by default the structure frames, the motion the output should have; optionally
the identity crops). The Noise Sensor compares the two per pixel, so both must come from the
same flow method over the same region. Flow is computed only inside a box (the mouth mask's
bounding box plus a margin, `mouth_box`) and is zero elsewhere.

OpenCV's DIS flow at its "fast" preset is the default. On real mouth crops (see
bench/noise_sensor.py) the "medium" preset tracks a pure known shift a little more closely, but
the Noise Sensor compares the flows of two differently-looking clips (flickering generated
frames against clean structure frames), and there "fast" is the more faithful sensor: with
injected flicker and 0.5 px jitter its noise pattern stays near the known jitter level where
"medium" reads flicker and genuine lip motion as extra noise (median 0.62-0.85 against
0.70-0.96, truth 0.71), on a clean clip against a re-rendered copy of the same motion it reads
3-5x less false noise, and it is 3-4x faster. Farneback misses sub-pixel jitter almost entirely.
"""

from __future__ import annotations

import cv2
import numpy as np

FLOW_METHODS = ("dis", "dis_fast", "farneback")
DEFAULT_FLOW_METHOD = "dis_fast"
DEFAULT_BOX_MARGIN = 16
"""Pixels added around the mouth mask's bounding box: flow near the box edge needs context."""

_DIS_PRESETS = {
    "dis": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    "dis_fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
}


def mouth_box(mask: np.ndarray, margin: int = DEFAULT_BOX_MARGIN) -> tuple[int, int, int, int] | None:
    """Bounding box of the mouth mask's non-zero pixels, grown by `margin` and clipped.

    Args:
        mask: `(H, W)` or `(T, H, W)` float in [0, 1] (any dtype; non-zero means inside). For a
            sequence the box covers the mask of every frame.
        margin: pixels added on every side.

    Returns:
        `(x0, y0, x1, y1)` int, half-open pixel bounds (`frame[y0:y1, x0:x1]`), or None when
        the mask is empty everywhere.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        inside = (mask != 0).any(axis=0)
    elif mask.ndim == 2:
        inside = mask != 0
    else:
        raise ValueError(f"mask must be (H, W) or (T, H, W), got {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return None
    h, w = inside.shape
    return (max(0, int(cols[0]) - margin), max(0, int(rows[0]) - margin),
            min(w, int(cols[-1]) + 1 + margin), min(h, int(rows[-1]) + 1 + margin))


def _flow_function(method: str):
    if method in _DIS_PRESETS:
        dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[method])
        return lambda a, b: dis.calc(a, b, None)
    if method == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(
            a, b, None, pyr_scale=0.5, levels=4, winsize=15, iterations=3,
            poly_n=5, poly_sigma=1.2, flags=0)
    raise ValueError(f"method must be one of {FLOW_METHODS}, got {method!r}")


def optical_flow(frames: np.ndarray, box: tuple[int, int, int, int] | None = None,
                 method: str = DEFAULT_FLOW_METHOD) -> np.ndarray:
    """Dense optical flow from each frame to the next.

    Args:
        frames: `(T, H, W, 3)` uint8 RGB, T >= 2.
        box: `(x0, y0, x1, y1)` half-open pixel bounds (see `mouth_box`); flow is computed on
            that region only and is zero outside it. None: the whole frame.
        method: one of `FLOW_METHODS`.

    Returns:
        `(T-1, H, W, 2)` float32: `flow[t, y, x] = (dx, dy)` in pixels, the displacement of
        pixel (x, y) of frame t into frame t+1.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    n, h, w, _ = frames.shape
    if n < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {n}")
    flow = np.zeros((n - 1, h, w, 2), dtype=np.float32)
    if box is None:
        box = (0, 0, w, h)
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return flow
    calc = _flow_function(method)
    gray = [cv2.cvtColor(np.ascontiguousarray(f[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY) for f in frames]
    for t in range(n - 1):
        flow[t, y0:y1, x0:x1] = calc(gray[t], gray[t + 1])
    return flow
