"""Metrics that need no learned network, and the published figures they stand next to.

Lip landmarks are the 20 iBUG-68 mouth points (48-67). PD is the Procrustes disparity of the
generated frame's lip points against the reference frame's (translation, scale and rotation
removed; `scipy.spatial.procrustes`), averaged over frames. CSLD and PCLD compare the two
lip-opening sequences (`freetalk_core.lips.lip_opening`: outer-lip distance over the
inter-ocular distance, so two faces of different sizes compare): cosine similarity and Pearson
correlation. Frames where either side has no landmarks are left out of all three.
"""

from __future__ import annotations

import math

import numpy as np

from freetalk_core.lips import lip_opening

LIP_POINTS = np.arange(48, 68)
"""iBUG-68 (0-based) mouth landmarks: outer lip 48-59, inner lip 60-67."""

HIGHER_IS_BETTER = {
    "PD": False, "CSLD": True, "PCLD": True, "CPBD": True, "MNP_before": False, "MNP_after": False,
    "FID": False, "LPIPS": False, "FVD": False, "LSE_C": True, "LSE_D": False, "CSIM": True,
}
"""Every reported metric and its direction (structure-frame lip metrics share their base's)."""

PAPER_RESULTS = {
    "HDTF": {"PD": 0.01026, "CSLD": 0.883, "PCLD": 0.718, "FID": 0.5, "LPIPS": 0.023, "CPBD": 0.289},
    "CREMA": {"PD": 0.00860, "CSLD": 0.887, "PCLD": 0.711, "FID": 1.5, "LPIPS": 0.020, "CPBD": 0.218},
}
"""FreeTalkDiff's Table 2 (self-reconstruction, 512 x 512, 25 fps; METHOD.md)."""


def _valid(landmarks: np.ndarray) -> np.ndarray:
    return np.isfinite(np.asarray(landmarks, dtype=np.float64)).all(axis=(1, 2))


def procrustes_disparities(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`(T,)` Procrustes disparity of the lip points per frame, NaN where either side has no
    landmarks (a NaN in its `(68, 2)` row). generated, reference: `(T, 68, 2)`."""
    from scipy.spatial import procrustes

    generated, reference = _paired(generated, reference)
    out = np.full(len(generated), np.nan)
    for t in np.flatnonzero(_valid(generated) & _valid(reference)):
        a, b = reference[t, LIP_POINTS], generated[t, LIP_POINTS]
        if np.ptp(a, axis=0).min() > 0 and np.ptp(b, axis=0).min() > 0:
            out[t] = procrustes(a, b)[2]
    return out


def _paired(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    generated = np.asarray(generated, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if generated.shape != reference.shape or generated.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be two (T, 68, 2) arrays, got {generated.shape} and {reference.shape}")
    return generated, reference


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two sequences (NaN for an all-zero one)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else math.nan


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two sequences (NaN when either is constant or shorter than 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def lip_sync_metrics(generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PD, CSLD, PCLD of generated against reference landmarks `(T, 68, 2)` (NaN rows: no
    face found), and `lip_frames`, how many frames both sides measured."""
    generated, reference = _paired(generated, reference)
    both = _valid(generated) & _valid(reference)
    pd = procrustes_disparities(generated, reference)
    if not both.any():
        return {"PD": math.nan, "CSLD": math.nan, "PCLD": math.nan, "lip_frames": 0.0}
    g, r = lip_opening(generated[both]), lip_opening(reference[both])
    return {"PD": float(np.nanmean(pd)) if np.isfinite(pd).any() else math.nan,
            "CSLD": cosine_similarity(g, r), "PCLD": pearson(g, r), "lip_frames": float(both.sum())}


def csim(embeddings: np.ndarray, identity_embeddings: np.ndarray) -> float:
    """Mean cosine similarity of paired face embeddings `(T, D)` (rows with a NaN left out)."""
    a = np.asarray(embeddings, dtype=np.float64)
    b = np.asarray(identity_embeddings, dtype=np.float64)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b = a[keep], b[keep]
    if not len(a):
        return math.nan
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def aggregate(per_item: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the items that have a finite value for it."""
    names = sorted({name for metrics in per_item.values() for name in metrics})
    out = {}
    for name in names:
        values = [m[name] for m in per_item.values() if name in m and math.isfinite(m[name])]
        if values:
            out[name] = float(np.mean(values))
    return out
