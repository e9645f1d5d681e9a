"""Invisible watermark: spread-transform dither modulation (STDM) of the frame's coarse luma.

A frame is seen as its `GRID x GRID` grid of cell mean lumas, in frame-relative coordinates
(so the mark survives scaling; cells are large, so it survives H.264 quantisation). Each of
the `PAYLOAD_BITS` payload bits (16-bit freetalk tag, 40-bit id, CRC-16 of the id) owns one keyed
orthogonal pattern over the cells (a permuted Hadamard row, orthogonal to a global brightness
change). To embed bit b, the projection of the frame's cells on its pattern is moved to the
nearest point of the lattice `STEP * k + dither + b * STEP / 2`; the change is spread back
over the frame as a smooth per-cell luma offset. Because the embedder cancels the picture's
own projection, the picture does not interfere with detection (Chen and Wornell's QIM).

Detection needs no original: each frame's projections give a soft vote per bit
(`cos` of the distance to bit 0's lattice), votes are summed over frames, and the mark is
found when the decoded tag and CRC both match: 32 check bits, so an unmarked video reads as
marked with probability 2**-32. `confidence` is the mean vote strength (1: every frame on the
lattice; an unmarked video's moving content averages towards 0).
"""

from __future__ import annotations

import binascii
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

import cv2
import numpy as np
from scipy.linalg import hadamard

GRID = 32
"""Cells per side of the frame-relative grid the mark lives on."""

TAG = 0xF7A1
"""16-bit freetalk tag: the first bits of every payload."""

TAG_BITS = 16
ID_BITS = 40
CRC_BITS = 16
PAYLOAD_BITS = TAG_BITS + ID_BITS + CRC_BITS

STEP = 32.0
"""Lattice step of a projection (unit-norm pattern over the cells, 8-bit luma levels). The
embedding moves each projection by at most STEP / 2; a distortion must move it by STEP / 4
to flip a frame's vote."""

EMBED_CORRECTIONS = 2
"""Re-measurements after the first embedding pass."""

REPEAT = 1
"""Patterns per payload bit (their votes add up)."""

KEY = 20240417
"""Seed of the cell permutation, the pattern choice and the dithers."""

MIN_CONFIDENCE = 0.2
"""Vote strength needed, besides matching tag and CRC, to call a mark found."""


@dataclass(frozen=True)
class Detection:
    """What `detect` read from a video."""

    found: bool
    watermark_id: str | None
    """The 40-bit id as 10 hex digits, when found."""
    confidence: float
    """Mean vote strength |sum of votes| / frames over the payload bits, 0..1."""
    tag_bit_errors: int
    frames_used: int


def watermark_id_for(item_id: str) -> str:
    """The 40-bit id (10 hex digits) that marks an item's output; the store keeps it."""
    return hashlib.sha256(item_id.encode()).hexdigest()[:ID_BITS // 4]


def _crc16(value: int) -> int:
    """CRC-16-CCITT of the id's bytes."""
    return binascii.crc_hqx(value.to_bytes(ID_BITS // 8, "big"), 0)


def payload_bits(watermark_id: str) -> np.ndarray:
    """`(PAYLOAD_BITS,) uint8` in {0, 1}: tag, id, CRC-16 of the id, most significant first."""
    if len(watermark_id) != ID_BITS // 4:
        raise ValueError(f"watermark id must be {ID_BITS // 4} hex digits, got {watermark_id!r}")
    value = int(watermark_id, 16)
    word = (TAG << (ID_BITS + CRC_BITS)) | (value << CRC_BITS) | _crc16(value)
    return np.array([(word >> (PAYLOAD_BITS - 1 - i)) & 1 for i in range(PAYLOAD_BITS)], np.uint8)


def decode_bits(bits: np.ndarray) -> tuple[int, str | None]:
    """`(tag bit errors, id)`; id is None unless the tag and the CRC both match."""
    word = 0
    for b in bits:
        word = (word << 1) | int(b)
    tag = word >> (ID_BITS + CRC_BITS)
    value = (word >> CRC_BITS) & ((1 << ID_BITS) - 1)
    tag_errors = bin(tag ^ TAG).count("1")
    if tag_errors or (word & 0xFFFF) != _crc16(value):
        return tag_errors, None
    return 0, f"{value:0{ID_BITS // 4}x}"


@lru_cache(maxsize=1)
def _patterns() -> np.ndarray:
    """`(PAYLOAD_BITS * REPEAT, GRID * GRID) float32` orthonormal patterns (no constant row);
    row `r * PAYLOAD_BITS + i` carries bit i."""
    rows = hadamard(GRID * GRID).astype(np.float32) / GRID
    rng = np.random.default_rng(KEY)
    cells = rng.permutation(GRID * GRID)
    chosen = rng.permutation(np.arange(1, GRID * GRID))[:PAYLOAD_BITS * REPEAT]
    return np.ascontiguousarray(rows[chosen][:, cells])


@lru_cache(maxsize=1)
def _dither() -> np.ndarray:
    return np.random.default_rng(KEY + 1).uniform(0, STEP, PAYLOAD_BITS * REPEAT).astype(np.float32)


def cell_means(frame: np.ndarray) -> np.ndarray:
    """`(GRID * GRID,) float32` mean luma of each grid cell of an `(H, W, 3) uint8` RGB frame."""
    # Area-averaging the colour frame first is the same mean (luma is linear) and much cheaper
    # than converting every pixel of a large frame.
    small = cv2.resize(np.ascontiguousarray(frame), (GRID * 4, GRID * 4), interpolation=cv2.INTER_AREA)
    luma = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.resize(luma, (GRID, GRID), interpolation=cv2.INTER_AREA).ravel()


def _projection_change(cells: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """`(PAYLOAD_BITS * REPEAT,)`: how far each projection must move to reach its bit's lattice."""
    target = _dither() + np.tile(bits, REPEAT) * (STEP / 2)
    projection = _patterns() @ cells
    return target + STEP * np.round((projection - target) / STEP) - projection


def embed(frame: np.ndarray, watermark_id: str) -> np.ndarray:
    """`(H, W, 3) uint8` RGB frame with the mark: the same smooth offset added to R, G and B,
    so only the luma moves (about 2.5 levels rms)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    bits = payload_bits(watermark_id)
    cells = cell_means(frame)
    offset = np.zeros(GRID * GRID, np.float32)
    # Smoothing moves the cell means a little off the lattice: correct on the smooth
    # low-resolution offset, whose cell means are what the full-size one adds.
    for _ in range(1 + EMBED_CORRECTIONS):
        realised = cv2.resize(_smooth_offset(offset), (GRID, GRID), interpolation=cv2.INTER_AREA).ravel()
        offset += _projection_change(cells + realised, bits) @ _patterns()
    h, w = frame.shape[:2]
    # Scaled up as 8-bit levels around 128 (fast), straight to 3 values per pixel: the field
    # is smooth, so the three samples per pixel are the same offset for R, G and B.
    biased = np.clip(np.rint(_smooth_offset(offset)) + 128, 0, 255).astype(np.uint8)
    full = cv2.resize(biased, (3 * w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)
    raised = cv2.add(frame, cv2.subtract(full, 128))
    return cv2.subtract(raised, cv2.subtract(np.full_like(full, 128), full))


def _smooth_offset(offset: np.ndarray) -> np.ndarray:
    """`(GRID * 8, GRID * 8) float32`: the per-cell luma `offset` `(GRID * GRID,)` as flat
    blocks (each keeps its cell's mean) lightly blurred to hide the block edges."""
    blocks = cv2.resize(offset.reshape(GRID, GRID), (GRID * 8, GRID * 8), interpolation=cv2.INTER_NEAREST)
    return cv2.GaussianBlur(blocks, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)


def embed_frames(frames: Iterable[np.ndarray], watermark_id: str) -> Iterator[np.ndarray]:
    """Stream `frames` (`(H, W, 3) uint8` RGB) marked one at a time."""
    payload_bits(watermark_id)
    for frame in frames:
        yield embed(frame, watermark_id)


def frame_votes(frame: np.ndarray) -> np.ndarray:
    """`(PAYLOAD_BITS,) float32` soft votes of one frame: +1 for bit 0, -1 for bit 1 (each the
    mean of its REPEAT patterns' votes)."""
    phase = (_patterns() @ cell_means(frame) - _dither()) * (2 * np.pi / STEP)
    return np.cos(phase).reshape(REPEAT, PAYLOAD_BITS).mean(axis=0)


def detect(frames: Iterable[np.ndarray]) -> Detection:
    """Read the mark from `frames` (`(H, W, 3) uint8` RGB, any size, any count) by summing
    each frame's votes."""
    votes = np.zeros(PAYLOAD_BITS, np.float64)
    n = 0
    for frame in frames:
        votes += frame_votes(frame)
        n += 1
    if n == 0:
        return Detection(False, None, 0.0, TAG_BITS, 0)
    confidence = float(np.mean(np.abs(votes)) / n)
    tag_errors, watermark_id = decode_bits((votes < 0).astype(np.uint8))
    found = watermark_id is not None and confidence >= MIN_CONFIDENCE
    return Detection(found, watermark_id if found else None, round(confidence, 3), tag_errors, n)
