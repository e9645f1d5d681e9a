"""The lips in iBUG-68 landmarks: how open the mouth is, and its most closed frame.

One measure serves the controller (`h_t`, METHOD.md step 5), the structure render (the opening
its mouth rig must show), the previews, the benchmarks and evaluation.
"""

from __future__ import annotations

import numpy as np

OUTER_LIP_PAIRS = ((50, 58), (51, 57), (52, 56))
"""iBUG-68 (0-based) upper/lower outer-lip landmark pairs: left, centre, right. Outer lip
points never touch, so the opening stays positive even with the lips closed."""
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
"""iBUG-68 (0-based) upper/lower inner-lip landmark pairs: left, centre, right."""

SMOOTHING_WINDOW = 5


def _landmark_array(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (T, 68, 2), got {landmarks.shape}")
    return landmarks


def raw_lip_distance(landmarks: np.ndarray, pairs=OUTER_LIP_PAIRS) -> np.ndarray:
    """`(T,)` float64 mean vertical distance from the upper to the lower lip point of `pairs`
    (by default the outer lip's), in the landmarks' units, before smoothing.
    landmarks: `(T, 68, 2)`."""
    landmarks = _landmark_array(landmarks)
    upper = landmarks[:, [p for p, _ in pairs], 1]
    lower = landmarks[:, [q for _, q in pairs], 1]
    return (lower - upper).mean(axis=1)


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
    """`h_t`: the lip opening per frame, smoothed with a centred moving average of `window`
    frames. landmarks: `(T, 68, 2)` in aligned-crop pixels; returns `(T,)` float64 crop px."""
    return centred_moving_average(raw_lip_distance(landmarks), window)


def closed_mouth_index(landmarks: np.ndarray, window: int = SMOOTHING_WINDOW) -> int:
    """The most closed frame, `argmin_t h_t` (the controller's anchor, the frame the structure
    render's mouth motion starts from). landmarks: `(T, 68, 2)`, T >= 1."""
    h = lip_distance(landmarks, window)
    if h.size == 0:
        raise ValueError("no frames")
    return int(np.argmin(h))


def _eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return landmarks[..., 36:42, :].mean(axis=-2), landmarks[..., 42:48, :].mean(axis=-2)


def normalised_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) float32 landmarks in the face's own frame: eyes level, origin between the eyes,
    unit inter-ocular distance (x right, y down).

    landmarks: (T, 68, 2) float32 px.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    left, right = _eye_centres(landmarks)
    axis = right - left
    distance = np.linalg.norm(axis, axis=-1, keepdims=True)
    c, s = (axis / distance)[..., 0], (axis / distance)[..., 1]
    centred = landmarks - ((left + right) / 2)[:, None]
    x = c[:, None] * centred[..., 0] + s[:, None] * centred[..., 1]
    y = -s[:, None] * centred[..., 0] + c[:, None] * centred[..., 1]
    return (np.stack([x, y], axis=-1) / distance[:, None]).astype(np.float32)


def lip_opening(landmarks: np.ndarray, pairs=OUTER_LIP_PAIRS) -> np.ndarray:
    """`(T,)` float64 unsmoothed lip opening in units of the inter-ocular distance: the same
    whatever the face's size, position and roll in the image (`pairs`: the outer lip's, or
    `INNER_LIP_PAIRS`). landmarks: `(T, 68, 2)` px."""
    return raw_lip_distance(normalised_landmarks(landmarks), pairs)


LIPS_TOUCHING = 0.03
"""Inner-lip opening (inter-ocular distances) above a clip's smallest up to which its lips
count as touching (`typical_closed_frames`)."""


def typical_closed_frames(landmarks: np.ndarray, count: int, touching: float = LIPS_TOUCHING) -> np.ndarray:
    """(<= count,) int64 frames of a person's usual closed mouth, the most typical first: the
    frames whose lips touch (inner opening within `touching` of the clip's smallest), ordered
    by how near their lip shape (normalised landmarks 48-67) is to the median of those frames.

    The most closed frame by the outer lips (`closed_mouth_index`) is an extreme: lips pressed
    together, their red partly hidden; a texture sampled there has paler lips than the
    person's. landmarks: (T, 68, 2) px, T >= 1."""
    inner = lip_opening(landmarks, INNER_LIP_PAIRS)
    candidates = np.flatnonzero(inner <= inner.min() + touching)
    lips = normalised_landmarks(np.asarray(landmarks)[candidates])[:, 48:68]
    distance = np.linalg.norm(lips - np.median(lips, axis=0), axis=2).mean(axis=1)
    return candidates[np.argsort(distance, kind="stable")][:max(count, 1)]
