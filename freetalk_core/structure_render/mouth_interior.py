"""What a structure frame shows between parted lips: a mouth interior painted in image space.

Where the mouth is open is the share of each pixel between the two inner lip edges as the
camera shows them (`cavity_coverage`: exact along each pixel column, so a parting narrower
than a pixel shows as a faint continuous line, not as the dashes a rasterized cavity leaves).
Inside it: a band of upper teeth just below the upper lip (as tall as a real mouth
shows them, never more than part of the opening, fading out towards the mouth corners), and a
dark throat below, shaded darker towards its middle. Nothing of the lip reference's own
mouth interior is used: only its opening reaches the structure frame, and a learned observer
(a face-mesh model, CLIP) reads a mouth with an inner lip edge and teeth as open where a flat
dark hole reads much less so.

Left out: a shadow darkening the lip along the inner edge (30 %, 1-2 px). Over the 132 pairs
of bench/structure_observers.py, with the rig's inner lips uncrossed, it helped dlib a little
(Pearson mean 0.964, min 0.856 with it; 0.961, 0.817 without) and MediaPipe's face mesh not
at all (0.849 both), but dlib then placed its inner-lip points inside a wide opening, so the
lips it found took in the dark interior (CIE Lab distance to the identity's lips above 6 on 7
pairs with it, 4 without). A tongue (the lower third of the opening, dark red) is read as
less open (MediaPipe 0.823 -> 0.809 on 44 of the pairs).
"""

from __future__ import annotations

import cv2
import numpy as np

THROAT_RGB = (4, 1, 2)
"""Colour of the mouth's depth: all but black. A lighter throat is read as less open by
MediaPipe's face mesh (30 pairs of bench/structure_observers.py, Pearson: (18, 7, 8) 0.773,
(4, 1, 2) 0.784, (60, 22, 24) 0.732; dlib 0.938, 0.938, 0.933)."""
TEETH_RGB = (222, 212, 196)
"""Colour of the teeth in neutral light (scaled by the identity's skin brightness)."""
SKIN_LUMINANCE = 150.0
"""Skin luminance (0-255) under which the teeth keep `TEETH_RGB`."""
TEETH_HEIGHT = 0.03
"""Height of the visible upper teeth, in inter-ocular distances, at a wide-open mouth: a hint
only. Taller bands (0.06-0.11) are read as open by MediaPipe's face mesh a little better still
but make dlib place the lower lip at their edge (dlib Pearson 0.92 -> 0.79 on four pairs of
bench/structure_observers.py at 0.11; none: MediaPipe 0.80 -> 0.75)."""
TEETH_SHARE = 0.25
"""At most this share of the opening (per image column) shows teeth."""
TEETH_OPENING = 0.12
"""Opening (per column, inter-ocular distances) from which the teeth show half their height
(none below half of it, all from 1.5 times it)."""
LOWER_TEETH = 0.0
"""Height of the visible lower teeth, as a share of the upper teeth's."""
LOWER_TEETH_SHADE = 0.8
"""Brightness of the lower teeth relative to the upper."""
SLIVER = 0.02
"""Pixels open by less than this share stay lip."""


def teeth_colour(skin_rgb: np.ndarray) -> np.ndarray:
    """(3,) float32 teeth colour under the lighting of a face whose skin has mean colour `skin_rgb`."""
    luminance = float(np.dot(np.asarray(skin_rgb, np.float64), [0.299, 0.587, 0.114]))
    return (np.array(TEETH_RGB, np.float32) * np.clip(luminance / SKIN_LUMINANCE, 0.6, 1.15)).astype(np.float32)


def cavity_coverage(upper_edge: np.ndarray, lower_edge: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the share of each pixel between the upper and the lower
    inner lip edge, each given as (K, 2) px points along it, the mouth corners included (in any
    order: they are joined in order of x). Pixel (r, c) spans [c, c + 1] x [r, r + 1]; each
    pixel column is cut at its centre; where the edges touch or cross, nothing is open."""
    coverage = np.zeros((size, size), np.float32)
    upper = upper_edge[np.argsort(upper_edge[:, 0])]
    lower = lower_edge[np.argsort(lower_edge[:, 0])]
    left, right = max(upper[0, 0], lower[0, 0]), min(upper[-1, 0], lower[-1, 0])
    cols = np.arange(max(int(np.floor(left)), 0), min(int(np.ceil(right)), size))
    cols = cols[(cols + 0.5 >= left) & (cols + 0.5 <= right)]
    centres = cols + 0.5
    top = np.interp(centres, upper[:, 0], upper[:, 1])
    bottom = np.interp(centres, lower[:, 0], lower[:, 1])
    open_ = bottom > top
    if not open_.any():
        return coverage
    cols, top, bottom = cols[open_], top[open_], bottom[open_]
    rows = np.arange(max(int(np.floor(top.min())), 0), min(int(np.ceil(bottom.max())), size))
    share = np.clip(np.minimum(rows[:, None] + 1.0, bottom) - np.maximum(rows[:, None], top), 0.0, 1.0)
    coverage[rows[:, None], cols[None, :]] = share
    return coverage


def paint_mouth_interior(colour: np.ndarray, inside: np.ndarray, inter_ocular_px: float,
                         teeth_rgb: np.ndarray) -> np.ndarray:
    """`colour` (S, S, 3) float32 with the mouth interior painted over the share `inside`
    (S, S) float in [0, 1] (`cavity_coverage`) of each pixel; the teeth and the throat's
    shading follow the pixels at least half open. Returns a new array."""
    colour = np.array(colour, np.float32, copy=True)
    rows, cols = np.nonzero(inside > SLIVER)
    if len(rows) == 0:
        return colour
    pad = 4
    y0, y1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, inside.shape[0])
    x0, x1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, inside.shape[1])
    share = np.clip(inside[y0:y1, x0:x1], 0.0, 1.0).astype(np.float32)
    mask = share > 0.5
    h, w = mask.shape
    has = mask.any(axis=0)
    top = np.where(has, mask.argmax(axis=0), 0)
    bottom = np.where(has, h - 1 - mask[::-1].argmax(axis=0), 0)
    opening = np.where(has, bottom - top + 1, 0).astype(np.float32)
    row = np.arange(h, dtype=np.float32)[:, None]

    # Across the mouth: full teeth in the middle, fading to none at the corners.
    open_cols = np.flatnonzero((share > SLIVER).any(axis=0))
    left, right = open_cols.min(), open_cols.max()
    across = (np.arange(w) - (left + right) / 2.0) / max((right - left) / 2.0, 1.0)
    profile = np.sqrt(np.clip(1.0 - across**2, 0.0, 1.0)).astype(np.float32)
    # A slit shows no teeth; a wide-open mouth the teeth's full height.
    showing = np.clip(opening / (TEETH_OPENING * inter_ocular_px) - 0.5, 0.0, 1.0)
    teeth_height = (np.minimum(TEETH_SHARE * opening, TEETH_HEIGHT * inter_ocular_px) * showing
                    * np.clip(1.6 * profile, 0, 1))
    from_top = row - top[None, :]
    from_bottom = bottom[None, :] - row
    upper = np.clip(teeth_height[None, :] - from_top, 0.0, 1.0) * (from_top >= 0)
    lower = (np.clip(LOWER_TEETH * teeth_height[None, :] - from_bottom, 0.0, 1.0) * (from_bottom >= 0)
             * (1 - upper))
    teeth = upper + lower
    # The teeth darken towards the corners and just under the upper lip's shadow; the lower
    # teeth are in the shadow of the upper ones.
    teeth_shade = (0.7 + 0.3 * profile)[None, :] * np.clip(0.75 + 0.25 * from_top, 0.75, 1.0)
    teeth_shade = teeth_shade * (1 - (1 - LOWER_TEETH_SHADE) * (lower > upper))

    # The throat: darkest in the middle of the opening.
    middle = (top + bottom)[None, :] / 2.0
    half = np.maximum(opening / 2.0, 1.0)[None, :]
    throat_shade = 1.0 - 0.35 * np.clip(1.0 - np.abs(row - middle) / half, 0.0, 1.0) * profile[None, :]

    interior = (np.array(THROAT_RGB, np.float32) * throat_shade[..., None] * (1 - teeth[..., None])
                + np.asarray(teeth_rgb, np.float32) * (teeth * teeth_shade)[..., None])
    soft = np.clip(cv2.GaussianBlur(share, (0, 0), 0.6), 0.0, 1.0)
    colour[y0:y1, x0:x1] = colour[y0:y1, x0:x1] * (1 - soft[..., None]) + interior * soft[..., None]
    return colour
