"""Anchor / Structure Controller (METHOD.md step 5).

The raw CLIP embedding of a structure frame under-represents subtle lip motion. The controller
measures how far the lip reference's mouth is open in every frame, picks the most closed frame
as the anchor, and moves each frame's patch tokens along the anchor-to-frame direction by the
frame-to-frame ratio of lip openings.
"""

from __future__ import annotations

import numpy as np

OUTER_LIP_PAIRS = ((50, 58), (51, 57), (52, 56))
"""iBUG-68 (0-based) upper/lower outer-lip landmark pairs: left, centre, right. Outer lip
points never touch, so the opening stays positive even with the lips closed."""

DEFAULT_LAMBDA_RANGE = (0.5, 2.0)
SMOOTHING_WINDOW = 5


def raw_lip_distance(landmarks: np.ndarray) -> np.ndarray:
    """Mean vertical upper-to-lower outer-lip distance per frame, before smoothing.

    Args:
        landmarks: `(T, 68, 2)` float, iBUG-68 points in aligned-crop pixels.

    Returns:
        `(T,)` float64, in the landmarks' pixel units.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (T, 68, 2), got {landmarks.shape}")
    upper = landmarks[:, [p for p, _ in OUTER_LIP_PAIRS], 1]
    lower = landmarks[:, [q for _, q in OUTER_LIP_PAIRS], 1]
    return np.abs(lower - upper).mean(axis=1)


def centred_moving_average(values: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """Centred moving average over `window` samples; the ends average what exists (no lag,
    no padding values invented)."""
    values = np.asarray(values, dtype=np.float64)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    half = window // 2
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo = np.clip(idx - half, 0, len(values))
    hi = np.clip(idx + half + 1, 0, len(values))
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def lip_distance(landmarks: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """`h_t`: lip opening per frame, smoothed with a centred moving average.

    Args:
        landmarks: `(T, 68, 2)` float, lip-reference landmarks in aligned-crop pixels.

    Returns:
        `(T,)` float64 lip distance in crop pixels.
    """
    return centred_moving_average(raw_lip_distance(landmarks), window)


def anchor_index(lip_distance: np.ndarray) -> int:
    """`a = argmin_t h_t`: the most closed lip-reference frame."""
    lip_distance = np.asarray(lip_distance)
    if lip_distance.size == 0:
        raise ValueError("lip_distance is empty")
    return int(np.argmin(lip_distance))


def lambdas(lip_distance: np.ndarray, clip_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE) -> np.ndarray:
    """`lambda_t = h_t / h_{t-1}`, `lambda_0 = 1`, clipped to `clip_range`.

    Args:
        lip_distance: `(T,)` lip openings `h_t`.

    Returns:
        `(T,)` float64.
    """
    h = np.asarray(lip_distance, dtype=np.float64)
    low, high = clip_range
    if not 0 < low <= 1 <= high:
        raise ValueError(f"clip_range must satisfy 0 < low <= 1 <= high, got {clip_range}")
    out = np.ones_like(h)
    if len(h) > 1:
        previous = h[:-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(previous > 0, h[1:] / np.where(previous > 0, previous, 1.0), high)
        out[1:] = ratio
    return np.clip(out, low, high)


def adjust_embeddings(embeddings: np.ndarray, anchor: int, lambdas: np.ndarray) -> np.ndarray:
    """`e'_t = e_a + lambda_t * (e_t - e_a)` on the patch tokens; the class token is kept.

    Args:
        embeddings: `(T, 257, D)` structure embeddings (token 0 is the class token).
        anchor: index `a` of the anchor frame.
        lambdas: `(T,)` per-frame factors.

    Returns:
        `(T, 257, D)` float32 adjusted embeddings.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    lam = np.asarray(lambdas, dtype=np.float32)
    if e.ndim != 3:
        raise ValueError(f"embeddings must be (T, tokens, D), got {e.shape}")
    if lam.shape != (e.shape[0],):
        raise ValueError(f"lambdas must be ({e.shape[0]},), got {lam.shape}")
    if not 0 <= anchor < e.shape[0]:
        raise ValueError(f"anchor {anchor} outside 0..{e.shape[0] - 1}")
    out = e.copy()
    e_anchor = e[anchor, 1:]
    out[:, 1:] = e_anchor + lam[:, None, None] * (e[:, 1:] - e_anchor)
    return out
