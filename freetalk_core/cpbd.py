"""CPBD: cumulative probability of blur detection, a no-reference sharpness metric.

Narvekar & Karam, "A No-Reference Image Blur Metric Based on the Cumulative Probability of
Blur Detection (CPBD)", IEEE Trans. Image Processing 20(9), 2011, as in the authors' MATLAB
release (CPBD_compute.m): higher is sharper, in [0, 1].

1. Vertical Sobel edges (MATLAB `edge(I, 'sobel', [], 'vertical')`: threshold 4 x the mean
   squared response, thinned to local maxima along x; a run of equal maxima keeps its leftmost
   pixel) are where edge widths are measured; Canny edges only decide which 64 x 64 blocks are
   edge blocks (more than 0.2% edge pixels).
2. The two detectors may put one edge one column apart: where an edge has two equal gradient
   maxima, floating-point rounding inside Canny picks either, and the pixel can fall on
   either side of a block border. So an edge block also takes the Sobel edges of the column
   just outside it where that column belongs to no edge block (a neighbouring non-edge block,
   or the part of the image that no whole block covers). Each Sobel edge counts at most once,
   and a sharp edge stays sharp wherever the two detectors place it. Inside blocks this is
   the release's rule unchanged.
3. Edge width (Marziliano et al.): along the row, from the edge pixel to the local intensity
   extrema on both sides, for edges whose gradient direction rounds to 0 or 180 degrees; each
   walk stops at the first step that is flat or turns back, for rising and falling edges
   alike (the release's strict comparisons).
4. Per edge block, the just-noticeable-blur width is 5 pixels when the block's contrast
   (max - min) is <= 50 grey levels, otherwise 3; an edge of width w is detected as blurred
   with probability P = 1 - exp(-|w / w_JNB|^3.6). The block's contrast applies to the edges
   it takes from the column outside it.
5. CPBD is the fraction of edges not detected as blurred, P <= P_JNB = 63%: the release's
   101-bin histogram summed over its first 64 bins, round(100 P) <= 63, so an edge exactly as
   wide as w_JNB (P = 1 - 1/e = 63.2%) counts as sharp.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.feature import canny

BLOCK_SIZE = 64
EDGE_BLOCK_FRACTION = 0.002
BETA = 3.6
JNB_CONTRAST_LIMIT = 50
WIDTH_JNB_LOW_CONTRAST = 5
WIDTH_JNB_HIGH_CONTRAST = 3
MAX_STEPS = 100
"""The release stops an edge-width walk after 101 steps per side."""


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3:
        image = cv2.cvtColor(image.astype(np.uint8) if image.dtype == np.uint8 else
                             image.astype(np.float32), cv2.COLOR_RGB2GRAY)
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W) grey or (H, W, 3) RGB, got {image.shape}")
    return image.astype(np.float64)


def sobel_vertical_edges(grey: np.ndarray) -> np.ndarray:
    """MATLAB-style thinned vertical Sobel edges. `(H, W)` float -> `(H, W)` bool.

    A pixel is kept where its squared response passes the cutoff, is greater than its left
    neighbour's and not less than its right neighbour's: a run of equal maxima along a row
    (an integer step's two columns) yields exactly one pixel, its leftmost."""
    kernel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64) / 8.0
    bx = np.abs(ndimage.correlate(grey, kernel, mode="nearest"))
    b = bx * bx
    cutoff = 4.0 * b.mean()
    left = np.concatenate([b[:, :1], b[:, :-1]], axis=1)
    right = np.concatenate([b[:, 1:], b[:, -1:]], axis=1)
    return (b > cutoff) & (left < b) & (right <= b)


def canny_edges(grey: np.ndarray) -> np.ndarray:
    """Canny with MATLAB's defaults: sigma sqrt(2); gradient magnitude scaled to [0, 1]; high
    threshold where a 64-bin histogram of it passes 70% of the pixels (at least 1/64); low =
    0.4 x high. `(H, W)` float -> `(H, W)` bool."""
    smooth = ndimage.gaussian_filter(grey, np.sqrt(2.0))
    magnitude = np.hypot(ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=0))
    top = float(magnitude.max())
    if top <= 0:
        return np.zeros(grey.shape, dtype=bool)
    counts, _ = np.histogram(magnitude / top, bins=64, range=(0.0, 1.0))
    high = (np.flatnonzero(np.cumsum(counts) > 0.7 * magnitude.size)[0] + 1) / 64.0
    # skimage thresholds its own (same Sobel) magnitude in absolute units: scale the image so
    # that magnitude runs over [0, 8] and give the thresholds in those units.
    return canny(grey / (top / 8.0), sigma=np.sqrt(2.0), low_threshold=0.4 * high * 8.0,
                 high_threshold=high * 8.0)


def _runs(condition: np.ndarray, reverse: bool) -> np.ndarray:
    """Per row, how many consecutive True values start at each column, walking right
    (reverse=False) or left (reverse=True); capped at MAX_STEPS."""
    h, w = condition.shape
    runs = np.zeros((h, w), dtype=np.int32)
    columns = range(w - 1, -1, -1) if not reverse else range(w)
    previous = np.zeros(h, dtype=np.int32)
    for j in columns:
        previous = np.where(condition[:, j], np.minimum(previous + 1, MAX_STEPS), 0)
        runs[:, j] = previous
    return runs


def edge_widths(grey: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Marziliano edge widths at edge pixels, 0 elsewhere. `(H, W)` -> `(H, W)` float."""
    h, w = grey.shape
    gy, gx = np.gradient(grey)
    angle = np.where(gx != 0, np.degrees(np.arctan2(gy, gx)), 0.0)
    angle = 45.0 * np.round(angle / 45.0)
    # d[:, j] = A[:, j+1] - A[:, j]; the column past the end stops every walk.
    d = np.concatenate([np.diff(grey, axis=1), np.zeros((h, 1))], axis=1)
    valid = np.ones((h, w), dtype=bool)
    valid[:, -1] = False
    rising_right = _runs((d > 0) & valid, reverse=False)    # A keeps increasing to the right
    rising_left = _runs((d > 0) & valid, reverse=True)      # A keeps decreasing to the left
    falling_left = _runs((d < 0) & valid, reverse=True)     # A keeps increasing to the left
    falling_right = _runs((d < 0) & valid, reverse=False)   # A keeps decreasing to the right

    def at(runs: np.ndarray, shift: int) -> np.ndarray:
        out = np.zeros_like(runs)
        if shift > 0:
            out[:, :-shift] = runs[:, shift:]
        else:
            out[:, -shift:] = runs[:, :w + shift]
        return out

    width_up = (1 + at(rising_right, 1)) + (1 + at(rising_left, -2))
    width_down = (1 + at(falling_left, -2)) + (1 + at(falling_right, 1))
    inner = np.zeros((h, w), dtype=bool)
    inner[1:-1, 1:-1] = True
    up = edges & inner & (angle == 0)
    down = edges & inner & (np.abs(angle) == 180)
    widths = np.zeros((h, w), dtype=np.float64)
    widths[up] = width_up[up]
    widths[down] = width_down[down]
    return widths


def edge_blocks(canny_map: np.ndarray) -> np.ndarray:
    """Which whole 64 x 64 blocks are edge blocks. `(H, W)` bool -> `(H // 64, W // 64)` bool."""
    rows, cols = canny_map.shape[0] // BLOCK_SIZE, canny_map.shape[1] // BLOCK_SIZE
    counts = canny_map[:rows * BLOCK_SIZE, :cols * BLOCK_SIZE].reshape(
        rows, BLOCK_SIZE, cols, BLOCK_SIZE).sum(axis=(1, 3))
    return counts > BLOCK_SIZE * BLOCK_SIZE * EDGE_BLOCK_FRACTION


def cpbd_from_edges(grey: np.ndarray, sobel_edges: np.ndarray, canny_map: np.ndarray) -> float:
    """CPBD of `grey` `(H, W)` float with given Sobel edges (where widths are measured) and
    Canny edges (which pick the edge blocks), both `(H, W)` bool; see the module docstring."""
    widths = edge_widths(grey, sobel_edges)
    blocks = edge_blocks(canny_map)
    w = grey.shape[1]
    probabilities = []
    for r, c in zip(*np.nonzero(blocks)):
        y, x = r * BLOCK_SIZE, c * BLOCK_SIZE
        # the column just outside, where no edge block holds it (module docstring, step 2)
        x0 = x - 1 if c > 0 and not blocks[r, c - 1] else x
        x1 = x + BLOCK_SIZE
        if x1 < w and (c + 1 == blocks.shape[1] or not blocks[r, c + 1]):
            x1 += 1
        local = widths[y:y + BLOCK_SIZE, x0:x1]
        local = local[local > 0]
        block = grey[y:y + BLOCK_SIZE, x:x + BLOCK_SIZE]
        contrast = block.max() - block.min()
        jnb = WIDTH_JNB_LOW_CONTRAST if contrast <= JNB_CONTRAST_LIMIT else WIDTH_JNB_HIGH_CONTRAST
        probabilities.append(1.0 - np.exp(-np.abs(local / jnb) ** BETA))
    if not probabilities:
        return 0.0
    p = np.concatenate(probabilities)
    if p.size == 0:
        return 0.0
    return float(np.mean(np.floor(p * 100 + 0.5) <= 63))


def cpbd(image: np.ndarray) -> float:
    """CPBD sharpness of one image.

    Args:
        image: `(H, W)` grey or `(H, W, 3)` RGB, values in 0..255 (uint8 or float). Only whole
            64 x 64 blocks are scored, so use at least 64 x 64 pixels.

    Returns:
        float in [0, 1], higher is sharper; 0.0 when there is no edge block.
    """
    grey = _grey(image)
    return cpbd_from_edges(grey, sobel_vertical_edges(grey), canny_edges(grey))
