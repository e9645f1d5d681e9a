"""Paste-back (METHOD.md step 9): a processed crop blended back into its full frame.

The crop transform `M` is `freetalk_core.face_crop`'s: a (2, 3) float32 similarity matrix
mapping frame pixels to crop pixels. Images are RGB uint8.
"""

from __future__ import annotations

import cv2
import numpy as np

from freetalk_core.face_crop import invert_transform, transform_points


def paste_back(frame: np.ndarray, crop: np.ndarray, M: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend `crop` back into `frame` through `mask`, with the inverse of the transform `M`.

    frame: (H, W, 3) uint8; crop: (S, S, 3) uint8; M: (2, 3) frame -> crop; mask: (S, S) float32
    in [0, 1]. Returns (H, W, 3) uint8. Pixels where the warped mask is 0 are exactly `frame`'s.
    Only the frame region under the mask is warped.
    """
    mask = np.asarray(mask, dtype=np.float32)
    out = frame.copy()
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return out
    left, right, top, bottom = xs.min() - 1, xs.max() + 1, ys.min() - 1, ys.max() + 1
    corners = np.array([[left, top], [right, top], [left, bottom], [right, bottom]], dtype=np.float64)
    frame_corners = transform_points(corners, invert_transform(M))
    h, w = frame.shape[:2]
    x0, y0 = np.floor(frame_corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(frame_corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return out
    # Frame pixel (x0 + u, y0 + v) maps to crop M @ (u + x0, v + y0): shift M by the region origin.
    M_roi = np.asarray(M, dtype=np.float64).copy()
    M_roi[:, 2] += M_roi[:, :2] @ np.array([x0, y0], dtype=np.float64)
    region_size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    alpha = cv2.warpAffine(mask, M_roi, region_size, flags=flags, borderMode=cv2.BORDER_CONSTANT)
    colour = cv2.warpAffine(crop, M_roi, region_size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    region = out[y0:y1, x0:x1]
    a = alpha[..., None]
    blended = np.round(region.astype(np.float32) * (1.0 - a) + colour.astype(np.float32) * a)
    region[:] = np.where(a > 0, np.clip(blended, 0, 255), region).astype(np.uint8)
    return out
