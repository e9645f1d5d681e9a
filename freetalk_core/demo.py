"""A short identity / lip-reference pair made from one still photo, for `freetalk demo`.

The photo is scikit-image's astronaut portrait (Eileen Collins, NASA, public domain), which
ships with scikit-image, so the demo runs offline. The identity clip sways the head gently;
the lip-reference clip keeps the head still and opens and closes the mouth in a syllable
rhythm, with a voiced buzz whose loudness follows the mouth opening as its audio track.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from freetalk_core import DEFAULT_FPS
from freetalk_core.errors import NoFaceError
from freetalk_core.video import write_video

FRAME_BOX = (65, 0, 385, 320)
"""(x0, y0, x1, y1) of the astronaut photo kept in the clips: a 320 x 320 head-and-shoulders view."""

AUDIO_RATE = 16000
SYLLABLE_HZ = 2.5
"""Mouth openings per second (about the syllable rate of speech)."""

MOUTH_INTERIOR_RGB = np.array([48, 14, 20], np.float32)


def demo_photo() -> np.ndarray:
    """`(320, 320, 3) uint8` RGB: the astronaut portrait cut to the head and shoulders."""
    import skimage.data

    x0, y0, x1, y1 = FRAME_BOX
    return np.ascontiguousarray(skimage.data.astronaut()[y0:y1, x0:x1])


def photo_landmarks(image: np.ndarray) -> np.ndarray:
    """`(68, 2) float32` iBUG-68 landmarks of the face in `image` `(H, W, 3) uint8`."""
    from freetalk_core.face_crop import LandmarkDetector

    landmarks = LandmarkDetector().detect(image)
    if landmarks is None:
        raise NoFaceError("no face found in the demo photo; check the scikit-image installation")
    return landmarks


def mouth_opening(t: np.ndarray) -> np.ndarray:
    """Mouth opening in [0, 1] at times `t` (s): smooth syllables under a slower loudness swell.

    Starts and ends closed; each syllable returns to fully closed.
    """
    t = np.asarray(t, dtype=np.float64)
    syllables = np.sin(np.pi * SYLLABLE_HZ * t) ** 2
    swell = 0.65 + 0.35 * np.sin(2 * np.pi * 0.6 * t + 0.3)
    return syllables * swell


def head_pose(t: float) -> tuple[float, float, float]:
    """(roll in degrees, dx px, dy px) of the identity clip's head sway at time `t` (s)."""
    roll = 3.0 * np.sin(2 * np.pi * 0.45 * t)
    dx = 4.0 * np.sin(2 * np.pi * 0.3 * t + 0.8)
    dy = 2.0 * np.sin(2 * np.pi * 0.55 * t + 1.7)
    return roll, dx, dy


def sway_frame(image: np.ndarray, landmarks: np.ndarray, t: float) -> np.ndarray:
    """`image` `(H, W, 3) uint8` rotated about the chin and shifted by `head_pose(t)`."""
    roll, dx, dy = head_pose(t)
    pivot = (float(landmarks[8, 0]), float(landmarks[8, 1]))
    M = cv2.getRotationMatrix2D(pivot, roll, 1.0)
    M[:, 2] += (dx, dy)
    h, w = image.shape[:2]
    return cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def open_mouth(image: np.ndarray, landmarks: np.ndarray, opening: float) -> np.ndarray:
    """`image` `(H, W, 3) uint8` with the jaw dropped by `opening` in [0, 1] (1 = wide open).

    The lower lip and jaw move down (most at the lips' centre, fading out towards the mouth
    corners and below the chin); the gap that opens between the lips is the dark mouth interior.
    """
    h, w = image.shape[:2]
    left, right = landmarks[48], landmarks[54]
    cx = (left[0] + right[0]) / 2
    half_width = (right[0] - left[0]) / 2
    lip_line = float(landmarks[60:68, 1].mean())
    lower_lip = float(landmarks[57, 1])
    chin = float(landmarks[8, 1])
    drop = float(opening) * 0.75 * float(half_width)

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # Below the lower lip the moving region widens towards the jaw's width.
    depth = _smoothstep((ys - lower_lip) / max(chin - lower_lip, 1.0))
    spread = half_width * (1.1 + 0.8 * depth)
    across = np.clip(np.abs(xs - cx) / spread, 0.0, 1.0)
    column = np.cos(0.5 * np.pi * across) ** 2
    fade_start = lower_lip + drop
    fade_end = chin + 0.8 * (chin - lower_lip) + drop
    down = 1.0 - _smoothstep((ys - fade_start) / max(fade_end - fade_start, 1.0))
    shift = drop * column * down * (ys >= lip_line)

    # float32 maps: OpenCV 5's remap never returns on float64 maps.
    source_y = (ys - shift).astype(np.float32)
    warped = cv2.remap(image, xs, source_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    # Inside the mouth: the share of each output pixel's rows in the gap that opens below the
    # lip line (its source would lie above it), none where the jaw does not drop.
    inside = np.clip(np.minimum(ys + 0.5, lip_line + shift) - np.maximum(ys - 0.5, lip_line), 0.0, 1.0)
    inside = cv2.GaussianBlur(inside, (0, 0), 0.8)[..., None]
    shade = 1.0 - 0.5 * np.clip((ys - lip_line) / max(drop, 1.0), 0.0, 1.0)[..., None]
    mouth = MOUTH_INTERIOR_RGB * (0.6 + 0.4 * shade)
    return np.clip(warped * (1 - inside) + mouth * inside + 0.5, 0, 255).astype(np.uint8)


def speech_audio(seconds: float) -> np.ndarray:
    """`(n,) float32` mono samples at AUDIO_RATE: a voiced buzz, loud where the mouth is open."""
    t = np.arange(int(round(seconds * AUDIO_RATE))) / AUDIO_RATE
    pitch = 140.0 + 12.0 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / AUDIO_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 9))
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.15
    loudness = mouth_opening(t) ** 0.7
    return (0.25 * loudness * (voice + noise)).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=AUDIO_RATE, layout="mono")
        pcm = np.clip(samples * 32767, -32768, 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, 0, Fraction(1, AUDIO_RATE)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def make_demo_clips(out_dir, seconds: float = 2.0, fps: float = DEFAULT_FPS) -> tuple[Path, Path]:
    """Write `identity.mp4` (head sway, no audio) and `lip_ref.mp4` (speaking mouth, with audio).

    Both are `round(seconds * fps)` frames of 320 x 320 at `fps`. Returns their paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = demo_photo()
    landmarks = photo_landmarks(image)
    times = np.arange(int(round(seconds * fps))) / fps

    identity = write_video(out_dir / "identity.mp4",
                           (sway_frame(image, landmarks, t) for t in times), fps)

    fd, wav = tempfile.mkstemp(prefix=".lip_ref_audio.", suffix=".wav", dir=out_dir)
    os.close(fd)
    try:
        _write_wav(Path(wav), speech_audio(seconds))
        lip_ref = write_video(out_dir / "lip_ref.mp4",
                              (open_mouth(image, landmarks, o) for o in mouth_opening(times)),
                              fps, audio=wav)
    finally:
        Path(wav).unlink(missing_ok=True)
    return identity, lip_ref
