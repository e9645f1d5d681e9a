"""Anchor / Structure Controller (METHOD.md step 5).

The raw CLIP embedding of a structure frame under-represents subtle lip motion. With `h_t` the
lip reference's lip opening in frame t (`freetalk_core.lips.lip_distance`: the mean of three
vertical outer-lip distances, left, centre and right, in crop pixels, smoothed with a centred
moving average of 5 frames) and the anchor `a = argmin_t h_t`, its most closed frame
(`freetalk_core.lips.closed_mouth_index`):

    lambda_t = h_t / h_{t-1}   (lambda_0 = 1), clipped to a range, [0.5, 2.0] by default
    e'_t = e_a + lambda_t * (e_t - e_a)

on the 256 patch tokens; the class token is kept. Opening lips (`lambda_t > 1`) move the
embedding away from the closed anchor, closing lips pull it back toward it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_LAMBDA_RANGE = (0.5, 2.0)


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
