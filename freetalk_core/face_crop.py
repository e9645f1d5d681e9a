"""Face crop (METHOD.md step 1): landmarks, their smoothing, the canonical crop and the mouth mask.

The face and its 68 iBUG landmarks are found in every frame (detected on a few frames and
tracked in between, `track_landmarks`) and the tracks smoothed over time (`fill_and_smooth`);
each frame is aligned by a similarity transform to the canonical 512 x 512 crop, and every
transform is kept for paste-back (`freetalk_core.paste_back`). A frame without a face never
stops the run: across a short gap where the face is still there the track is interpolated
(`bridge_gaps`), otherwise the original frame passes through unchanged.

Landmarks are iBUG-68 points (0-based index order), float32 (x, y) pixels. A crop transform
`M` is a (2, 3) float32 similarity matrix mapping frame pixels to crop pixels
(`crop = M @ [x, y, 1]`). Images are RGB uint8.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

import cv2
import dlib
import numpy as np
from scipy.signal import savgol_filter

from freetalk_core import CROP_SIZE
from freetalk_core.errors import ModelFileError, NoFaceError

# ---------------------------------------------------------------------------------------------
# The canonical crop template
# ---------------------------------------------------------------------------------------------

CROP_TEMPLATE = np.array(
    [
        121.4, 228.0, 122.6, 263.4, 126.7, 298.6, 132.6, 333.8,
        143.7, 366.9, 162.7, 395.8, 189.0, 419.1, 220.0, 436.5,
        256.0, 442.3, 292.0, 436.5, 323.0, 419.1, 349.3, 395.8,
        368.3, 366.9, 379.4, 333.8, 385.3, 298.6, 389.4, 263.4,
        390.6, 228.0, 147.2, 188.3, 163.6, 172.5, 186.2, 166.3,
        210.3, 168.0, 232.7, 177.2, 279.3, 177.2, 301.7, 168.0,
        325.8, 166.3, 348.4, 172.5, 364.8, 188.3, 256.0, 207.0,
        256.0, 227.5, 256.0, 248.2, 256.0, 269.6, 230.1, 292.5,
        242.7, 296.1, 256.0, 299.2, 269.3, 296.1, 281.9, 292.5,
        172.9, 216.1, 187.4, 207.3, 204.6, 207.0, 220.3, 217.3,
        204.0, 220.8, 186.9, 221.3, 291.7, 217.3, 307.4, 207.0,
        324.6, 207.3, 339.1, 216.1, 325.1, 221.3, 308.0, 220.8,
        205.2, 349.0, 223.3, 334.1, 242.7, 326.4, 256.0, 329.5,
        269.3, 326.4, 288.7, 334.1, 306.8, 349.0, 289.4, 366.7,
        270.5, 374.5, 256.0, 376.0, 241.5, 374.5, 222.6, 366.7,
        214.1, 348.8, 242.6, 340.6, 256.0, 341.3, 269.4, 340.6,
        297.9, 348.8, 269.7, 354.0, 256.0, 355.3, 242.3, 354.0,
    ],
    dtype=np.float32,
).reshape(68, 2)
"""(68, 2) float32: the mean iBUG-68 face (eyes level, mirror-symmetric) in a 512 x 512 crop.

A generalised Procrustes mean of dlib landmarks over 171 frames of 12 sample clips, placed so
that the eye centres sit at (196, 215) and (316, 215), the mouth centre at (256, 350) and the chin
at (256, 442) (inter-ocular distance 120 px): the whole face, chin included, fits with a margin.
"""

ALIGNMENT_POINTS = np.array(
    [0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45], dtype=np.int64
)
"""Landmarks the crop transform is fitted to: the upper jaw, the nose, the eye corners.

The mouth and the chin are left out on purpose: they move when the person speaks, and the crop
must not move with them.
"""

LIP_OUTER = np.arange(48, 60)
LIP_INNER = np.arange(60, 68)
JAW = np.arange(0, 17)
NOSE_BASE = np.arange(31, 36)
LEFT_EYE = np.arange(36, 42)
RIGHT_EYE = np.arange(42, 48)


# ---------------------------------------------------------------------------------------------
# Detection and tracking
# ---------------------------------------------------------------------------------------------


def _models_folder() -> Path:
    # face_recognition_models/__init__.py imports pkg_resources, which newer setuptools no
    # longer ships: locate the package without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the face_recognition_models package is not installed: "
            "pip install face-recognition-models"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def choose_face(boxes: np.ndarray, face_index: int = 0, face_box=None) -> int | None:
    """Which of the detector's `boxes (N, 4)` (x0, y0, x1, y1) is the face asked for, or None.

    With `face_box` (x0, y0, x1, y1), the face whose box overlaps it most (intersection over
    union, above 0); otherwise the `face_index`-th face by box area, 0 being the largest.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    if face_box is None:
        order = np.argsort(-areas, kind="stable")
        return int(order[face_index]) if 0 <= face_index < len(order) else None
    x0, y0, x1, y1 = (float(v) for v in face_box)
    width = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
    height = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
    inter = width * height
    iou = inter / np.maximum(areas + max(x1 - x0, 0) * max(y1 - y0, 0) - inter, 1e-9)
    best = int(np.argmax(iou))
    return best if iou[best] > 0 else None


def _landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """(4,) float64 (x0, y0, x1, y1): the bounding box of (68, 2) landmarks."""
    return np.concatenate([landmarks.min(axis=0), landmarks.max(axis=0)]).astype(np.float64)


MIRRORED_POINTS = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])
"""The 68-point landmark each one becomes in the mirrored face (left and right swapped)."""


class LandmarkDetector:
    """dlib's HOG frontal face detector and its 68-point shape predictor.

    The detector runs on the frame shrunk to `detect_size` px on its long side (upsampled once
    where no face is found at that size, for small faces in large frames); the shape predictor
    runs at full resolution, on a face resampled to `predict_size` px where its box is smaller,
    and, with `mirror`, also on the mirrored face, the two answers averaged: on a small,
    low-resolution face the predictor's points jump by a pixel or more from frame to frame, a
    large share of a lip opening. `detect_near` searches a region around a known face box at
    full resolution, for tracking.
    """

    def __init__(self, predictor_path: str | Path | None = None, detect_size: int = 512,
                 predict_size: float = 320.0, mirror: bool = True):
        default = _models_folder() / "shape_predictor_68_face_landmarks.dat"
        path = Path(predictor_path) if predictor_path else default
        if not path.is_file():
            raise ModelFileError(f"missing landmark model {path}: reinstall face-recognition-models")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(path))
        self.detect_size = detect_size
        self.predict_size = predict_size
        self.mirror = mirror

    def predict(self, frame: np.ndarray, box) -> np.ndarray:
        """(68, 2) float32 landmarks of the face in `box` (x0, y0, x1, y1) of `frame` (H, W, 3) uint8."""
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0, 1.0)
        origin, scale = np.zeros(2), 1.0
        if side < self.predict_size:
            # The face and a margin of 60 % of its box, resampled (bicubic) to `predict_size`;
            # pixel centres map as cv2.resize maps them.
            h, w = frame.shape[:2]
            margin = 0.6 * side
            rx0, ry0 = int(max(0, x0 - margin)), int(max(0, y0 - margin))
            rx1, ry1 = int(min(w, x1 + margin + 1)), int(min(h, y1 + margin + 1))
            scale = self.predict_size / side
            frame = cv2.resize(frame[ry0:ry1, rx0:rx1], None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            origin = np.array([rx0, ry0], np.float64)
            x0, x1 = ((x - rx0 + 0.5) * scale - 0.5 for x in (x0, x1))
            y0, y1 = ((y - ry0 + 0.5) * scale - 0.5 for y in (y0, y1))
        landmarks = self._shape(frame, (x0, y0, x1, y1))
        if self.mirror:
            right = frame.shape[1] - 1
            mirrored = self._shape(frame[:, ::-1], (right - x1, y0, right - x0, y1))[MIRRORED_POINTS]
            mirrored[:, 0] = right - mirrored[:, 0]
            landmarks = (landmarks + mirrored) / 2
        if scale != 1.0:
            landmarks = (landmarks + 0.5) / scale - 0.5
        return (landmarks + origin).astype(np.float32)

    def _shape(self, image: np.ndarray, box) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self.predictor(np.ascontiguousarray(image), dlib.rectangle(x0, y0, x1, y1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def _detect_boxes(self, image: np.ndarray, upsample: int) -> tuple[np.ndarray, np.ndarray]:
        rects, scores, _ = self.detector.run(np.ascontiguousarray(image), upsample, 0.0)
        boxes = np.array([(r.left(), r.top(), r.right(), r.bottom()) for r in rects], dtype=np.float64)
        return boxes.reshape(-1, 4), np.asarray(scores, dtype=np.float64)

    def detect_box(self, frame: np.ndarray, face_index: int = 0, face_box=None) -> np.ndarray | None:
        """(4,) float64 box (x0, y0, x1, y1) in frame px of the face asked for (`choose_face`:
        the largest by default), or None.

        Found on the shrunk frame (upsampled once where that face is not found), then placed
        again by `detect_near` at full resolution: a box from the shrunk (and upsampled) frame
        is a few pixels off, and the shape predictor follows its box.
        """
        h, w = frame.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))
        small = frame
        if scale < 1.0:
            small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        box = None
        for upsample in (0, 1):
            boxes = self._detect_boxes(small, upsample)[0] / scale
            chosen = choose_face(boxes, face_index, face_box)
            if chosen is not None:
                box = boxes[chosen]
                break
        if box is None:
            return None
        if scale < 1.0:
            refined = self.detect_near(frame, box)
            box = box if refined is None else refined
        return box

    def detect(self, frame: np.ndarray, face_index: int = 0, face_box=None) -> np.ndarray | None:
        """(68, 2) float32 landmarks of the face asked for (`choose_face`: the largest by
        default) in `frame` (H, W, 3) uint8, or None."""
        box = self.detect_box(frame, face_index, face_box)
        return None if box is None else self.predict(frame, box)

    def detect_all(self, frames) -> np.ndarray:
        """`(T, 68, 2)` float32 landmarks of the largest face in each of `frames` (a sequence
        of `(H, W, 3)` uint8 images), NaN where none is found."""
        found = [self.detect(frame) for frame in frames]
        return np.stack([np.full((68, 2), np.nan, np.float32) if f is None else f for f in found]) \
            if found else np.zeros((0, 68, 2), np.float32)

    def detect_near(self, frame: np.ndarray, box, face_px: float = 120.0) -> np.ndarray | None:
        """(4,) float64 detector box of the face near `box` (x0, y0, x1, y1) in frame px, or None.

        Searches a region twice the size of `box` around its centre, resampled so that the face
        is about `face_px` wide (the HOG detector's window is 80 px).
        """
        h, w = frame.shape[:2]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = max(box[2] - box[0], box[3] - box[1])
        rx0, ry0 = int(max(0, cx - side)), int(max(0, cy - side))
        rx1, ry1 = int(min(w, cx + side)), int(min(h, cy + side))
        if rx1 - rx0 < 16 or ry1 - ry0 < 16:
            return None
        region = frame[ry0:ry1, rx0:rx1]
        scale = face_px / max(side, 1.0)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        region = cv2.resize(region, None, fx=scale, fy=scale, interpolation=interp)
        boxes, scores = self._detect_boxes(region, 0)
        if len(boxes) == 0:
            return None
        boxes = boxes / scale + np.array([rx0, ry0, rx0, ry0])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        nearest = int(np.argmin(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)))
        return boxes[nearest]


DLIB_BOX_IN_TEMPLATE = (256.0, 273.0, 283.0)
"""Centre x, y and side of the box dlib's HOG detector puts around a face, in `CROP_TEMPLATE`
px (the mean over 27 sample frames of 9 clips; side std 28 px)."""

KEYPOINTS_IN_TEMPLATE = np.stack([
    CROP_TEMPLATE[LEFT_EYE].mean(0), CROP_TEMPLATE[RIGHT_EYE].mean(0), CROP_TEMPLATE[30],
    CROP_TEMPLATE[48], CROP_TEMPLATE[54]]).astype(np.float64)
"""The five keypoints of insightface's detectors (eye centres, nose tip, mouth corners, in the
image's left-to-right order) in `CROP_TEMPLATE` px."""


class InsightFaceDetector(LandmarkDetector):
    """insightface's SCRFD face detector (the buffalo_l pack's `det_10g.onnx`) finds the faces;
    dlib's 68-point shape predictor places the landmarks, as for `LandmarkDetector`.

    Each face's five keypoints are mapped, through the crop template, to the box dlib's detector
    would give (`DLIB_BOX_IN_TEMPLATE`): the shape predictor follows its box. Frames are given
    to SCRFD at `input_size`; `detect_near` searches a region resampled around a known face,
    as with dlib.
    """

    def __init__(self, onnx_path: str | Path, predictor_path: str | Path | None = None,
                 input_size: int = 640, det_thresh: float = 0.5):
        super().__init__(predictor_path, detect_size=input_size)
        from insightface.model_zoo import get_model
        from insightface.model_zoo.scrfd import SCRFD

        model = get_model(str(onnx_path), providers=["CPUExecutionProvider"])
        if not isinstance(model, SCRFD) or not model.use_kps:
            raise ModelFileError(f"{onnx_path} is not an SCRFD face detector with keypoints "
                                 "(the buffalo_l pack's det_10g.onnx)")
        model.prepare(ctx_id=-1, input_size=(input_size, input_size), det_thresh=det_thresh)
        self.model, self.input_size = model, input_size

    def _detect_boxes(self, image: np.ndarray, upsample: int) -> tuple[np.ndarray, np.ndarray]:
        factor = 2 ** upsample
        if factor > 1:
            image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        # insightface works on BGR images (its blob step swaps back to RGB).
        detections, keypoints = self.model.detect(np.ascontiguousarray(image[..., ::-1]),
                                                  input_size=(self.input_size, self.input_size))
        cx, cy, side = DLIB_BOX_IN_TEMPLATE
        boxes = []
        for points in keypoints:
            to_frame = _similarity(KEYPOINTS_IN_TEMPLATE, points.astype(np.float64))
            centre = to_frame[:, :2] @ np.array([cx, cy]) + to_frame[:, 2]
            half = side * np.sqrt(abs(np.linalg.det(to_frame[:, :2]))) / 2
            boxes.append(np.concatenate([centre - half, centre + half]))
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4) / factor
        return boxes, np.asarray(detections[:, 4], dtype=np.float64)


DETECTORS = ("dlib", "insightface")
"""Face detectors `make_detector` knows: dlib's HOG (the default, offline) and insightface's SCRFD."""


def make_detector(name: str = "dlib", models_dir: str | Path | None = None) -> LandmarkDetector:
    """The landmark detector of that name; insightface's reads MODELS/insightface."""
    if name == "dlib":
        return LandmarkDetector()
    if name == "insightface":
        from freetalk_core.models import insightface_detector_path

        if models_dir is None:
            raise ModelFileError("--detector insightface needs a models directory")
        return InsightFaceDetector(insightface_detector_path(models_dir))
    raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {name!r}")


class _BoxFromLandmarks:
    """Where the detector would put its box, given landmarks: learnt from the last detection.

    The shape predictor expects a box placed like the detector's; tracking feeds it a box
    derived from the previous frame's landmarks, so that box must sit where the detector's
    would.
    """

    def __init__(self):
        self.offset = np.array([0.0, 0.1, 0.0, 0.1])  # box edges minus landmark-box edges, / size

    def learn(self, detector_box: np.ndarray, landmarks: np.ndarray) -> None:
        lbox = _landmark_box(landmarks)
        size = max(lbox[2] - lbox[0], lbox[3] - lbox[1], 1.0)
        self.offset = (detector_box - lbox) / size

    def __call__(self, landmarks: np.ndarray) -> np.ndarray:
        lbox = _landmark_box(landmarks)
        size = max(lbox[2] - lbox[0], lbox[3] - lbox[1], 1.0)
        return lbox + self.offset * size


def _inter_ocular(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[LEFT_EYE].mean(0) - landmarks[RIGHT_EYE].mean(0)))


def _face_patch(frame: np.ndarray, landmarks: np.ndarray, size: int = 32) -> np.ndarray:
    """(size * size,) float32 zero-mean, unit-norm grey patch of the eyes and nose region."""
    M = _similarity(
        landmarks[ALIGNMENT_POINTS].astype(np.float64), CROP_TEMPLATE[ALIGNMENT_POINTS].astype(np.float64)
    )
    # The template's eyes-and-nose square, (150, 150)-(362, 320), mapped onto size x size.
    to_patch = np.array([[size / 212.0, 0, -150.0 * size / 212.0], [0, size / 170.0, -150.0 * size / 170.0]])
    A = np.vstack([to_patch, [0, 0, 1]]) @ np.vstack([M, [0, 0, 1]])
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
    patch = cv2.warpAffine(grey, A[:2], (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    patch = patch.astype(np.float32).ravel()
    patch -= patch.mean()
    return patch / max(float(np.linalg.norm(patch)), 1e-6)


def track_landmarks(
    frames: Iterable[np.ndarray],
    detector: LandmarkDetector | None = None,
    detect_every: int = 5,
    max_drift: float = 0.08,
    min_similarity: float = 0.5,
    face_index: int = 0,
    face_box=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Detect the face on a few frames and track it in between.

    Where several faces are in frame, the one tracked is chosen by `choose_face` (`face_index`,
    `face_box`; the largest by default) whenever the whole frame is searched; in between, the
    search near the last face keeps to that face.

    Every `detect_every` frames, and whenever tracking looks unreliable, the HOG detector
    confirms the face in a region around the last one at full resolution, falling back to a
    whole-frame detection; in between, the shape predictor runs on a box derived from the
    previous frame's landmarks. Tracking looks unreliable when the predictor, re-run on the box
    of its own answer, moves the points by more than `max_drift` inter-ocular distances, or when
    the eyes-and-nose patch correlates less than `min_similarity` with the one at the last
    detection (a cut, an occlusion, the face gone).

    frames: iterable of (H, W, 3) uint8 RGB, consumed once (a streaming reader is fine).
    Returns landmarks (T, 68, 2) float32 in frame px (zeros where not found) and found (T,) bool.
    """
    detector = detector or LandmarkDetector()
    box_from = _BoxFromLandmarks()
    out_landmarks: list[np.ndarray] = []
    out_found: list[bool] = []
    previous: np.ndarray | None = None
    reference_patch: np.ndarray | None = None
    since_detection = 0

    for frame in frames:
        landmarks = None
        if previous is not None and since_detection < detect_every:
            landmarks = detector.predict(frame, box_from(previous))
            check = detector.predict(frame, box_from(landmarks))
            drift = np.abs(check - landmarks).mean() / max(_inter_ocular(landmarks), 1.0)
            if drift > max_drift or _face_patch(frame, landmarks) @ reference_patch < min_similarity:
                landmarks = None
            since_detection += 1
        if landmarks is None:
            box = detector.detect_near(frame, box_from(previous)) if previous is not None else None
            if box is None:
                box = detector.detect_box(frame, face_index, face_box)
            if box is not None:
                landmarks = detector.predict(frame, box)
                box_from.learn(box, landmarks)
                reference_patch = _face_patch(frame, landmarks)
            since_detection = 1
        previous = landmarks
        out_found.append(landmarks is not None)
        out_landmarks.append(landmarks if landmarks is not None else np.zeros((68, 2), np.float32))

    if not out_landmarks:
        return np.zeros((0, 68, 2), np.float32), np.zeros((0,), bool)
    return np.stack(out_landmarks).astype(np.float32), np.array(out_found, dtype=bool)


# ---------------------------------------------------------------------------------------------
# Gaps and smoothing
# ---------------------------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the True runs of a (T,) bool array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _short_gaps(found: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """[start, stop) runs of frames without a face of at most `max_gap` frames."""
    return [(start, stop) for start, stop in _runs(~np.asarray(found, dtype=bool)) if stop - start <= max_gap]


def gap_frame_indices(found: np.ndarray, max_gap: int = 12) -> np.ndarray:
    """(N,) int64 sorted frame numbers `bridge_gaps` looks at: the frames of every gap of at
    most `max_gap` frames and the frame with a face on either side of it."""
    found = np.asarray(found, dtype=bool)
    wanted = [np.arange(max(start - 1, 0), min(stop + 1, len(found))) for start, stop in _short_gaps(found, max_gap)]
    return np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.int64)


def _colour_histogram(frame: np.ndarray) -> np.ndarray:
    """(512,) float32 normalised 8x8x8 RGB histogram of `frame` shrunk to 64 px wide."""
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (64, max(1, round(64 * h / w))), interpolation=cv2.INTER_AREA)
    hist = cv2.calcHist([np.ascontiguousarray(small)], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
    return (hist / max(float(hist.sum()), 1.0)).astype(np.float32)


def shot_change(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance in [0, 1] between the colour histograms of frames `a` and `b`.

    Consecutive frames of one shot stay below 0.09 on the sample clips (motion, blinks,
    speech); two different clips, or a clip and a black frame, are at least 0.41 apart.
    """
    return float(cv2.compareHist(_colour_histogram(a), _colour_histogram(b), cv2.HISTCMP_BHATTACHARYYA))


def bridge_gaps(
    landmarks: np.ndarray,
    found: np.ndarray,
    frames,
    max_gap: int = 12,
    max_shot_change: float = 0.25,
    min_similarity: float = 0.6,
) -> np.ndarray:
    """Which frames without a face still show it: the detector missed (motion blur, a hand
    passing), as opposed to a cut-away (black frames, a shot of something else).

    Only gaps of at most `max_gap` frames are considered. A gap frame is bridged when it is
    reached from a frame with a face on one side of the gap without a shot change on the way
    (`shot_change` above `max_shot_change` between consecutive frames), and its eyes-and-nose
    patch, at the landmarks interpolated across the gap, correlates at least `min_similarity`
    with that side's patch (the sample faces: 0.75-0.99, blurred too; another person at the
    same place: at most 0.44; a black or flat frame: 0).

    landmarks: (T, 68, 2) float32 as tracked; found: (T,) bool; frames: iterable of the (H, W,
    3) uint8 frames `gap_frame_indices(found, max_gap)` names, in that order, consumed once and
    held one gap at a time (a streaming reader is fine).
    Returns bridged (T,) bool: True on frames without a face that are to be filled.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    found = np.asarray(found, dtype=bool)
    bridged = np.zeros(len(found), dtype=bool)
    if not found.any():
        return bridged
    t = np.arange(len(found))
    known = np.flatnonzero(found)
    flat = landmarks.reshape(len(t), -1)
    stream = zip(gap_frame_indices(found, max_gap).tolist(), frames)
    held: dict[int, np.ndarray] = {}
    for start, stop in _short_gaps(found, max_gap):
        held = {k: v for k, v in held.items() if k >= start - 1}
        last = min(stop, len(found) - 1)
        while last not in held:
            number, frame = next(stream, (None, None))
            if number is None:
                raise ValueError("frames ended before the frames gap_frame_indices names")
            held[number] = frame
        span = np.arange(start, stop)
        between = np.stack([np.interp(span, known, flat[known, k]) for k in range(flat.shape[1])], axis=1)
        between = between.reshape(-1, 68, 2).astype(np.float32)
        sides = []  # (face frame, gap frames in order walking away from it)
        if start > 0:
            sides.append((start - 1, list(span)))
        if stop < len(found):
            sides.append((stop, list(span[::-1])))
        for face, walk in sides:
            reference = _face_patch(held[face], landmarks[face])
            previous = face
            for frame_number in walk:
                if shot_change(held[previous], held[frame_number]) > max_shot_change:
                    break
                patch = _face_patch(held[frame_number], between[frame_number - start])
                if patch @ reference >= min_similarity:
                    bridged[frame_number] = True
                previous = frame_number
    return bridged


def fill_and_smooth(
    landmarks: np.ndarray,
    found: np.ndarray,
    bridged: np.ndarray | None = None,
    window: int = 5,
    source: str = "the video",
) -> tuple[np.ndarray, np.ndarray]:
    """Fill the frames without a face and smooth the landmark tracks over time.

    `bridged` frames (`bridge_gaps`: no face found, but it is still there) are filled linearly
    between the faces on either side, or by holding the nearest face at the start or end of the
    clip. Every other frame without a face is marked passthrough (the original frame is used as
    is) and holds the nearest face, so every frame still has a usable crop transform. Each run
    of non-passthrough frames is then smoothed with a centred Savitzky-Golay filter (`window`
    frames, quadratic; 1: none): no lag, and lip peaks are kept better than by a moving average.

    landmarks: (T, 68, 2) float32 frame px; found, bridged: (T,) bool (bridged: none when not
    given); source names the video in errors.
    Returns landmarks (T, 68, 2) float32 and passthrough (T,) bool.
    Raises NoFaceError if no frame has a face.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    found = np.asarray(found, dtype=bool)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2) or found.shape != landmarks.shape[:1]:
        raise ValueError(
            f"expected landmarks (T, 68, 2) and found (T,), got {landmarks.shape} and {found.shape}"
        )
    bridged = np.zeros_like(found) if bridged is None else np.asarray(bridged, dtype=bool) & ~found
    if not found.any():
        raise NoFaceError(
            f"no face found in {source}: use a video where one face is visible, frontal and "
            "well lit, in most frames"
        )
    t = np.arange(len(found))
    known = np.flatnonzero(found)
    flat = landmarks.reshape(len(t), -1)
    filled = np.stack([np.interp(t, known, flat[known, k]) for k in range(flat.shape[1])], axis=1)
    # np.interp holds the end values outside the known range, which is the policy at the edges.
    passthrough = ~(found | bridged)
    if passthrough.any():
        missing = np.flatnonzero(passthrough)
        nearest = known[np.argmin(np.abs(known[:, None] - missing[None]), axis=0)]
        filled[missing] = flat[nearest]
    smoothed = filled.copy()
    window = window if window % 2 else window + 1
    for start, stop in _runs(~passthrough):
        # Odd, at most the run's length; the ends get a polynomial fit, not padding, so a
        # steadily moving track is not bent at the run's first and last frames.
        run_window = min(window, stop - start if (stop - start) % 2 else stop - start - 1)
        if run_window >= 3:
            smoothed[start:stop] = savgol_filter(filled[start:stop], run_window, 2, axis=0, mode="interp")
    return smoothed.reshape(landmarks.shape).astype(np.float32), passthrough


# ---------------------------------------------------------------------------------------------
# Crop transforms, warping, mouth mask
# ---------------------------------------------------------------------------------------------


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) float64 least-squares similarity (Umeyama, no reflection) mapping src to dst (N, 2)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / (s**2).sum(axis=1).mean()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def crop_transforms(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Similarity transforms from each frame to the canonical crop.

    Fitted (least squares) from the frame's `ALIGNMENT_POINTS` to the same points of
    `CROP_TEMPLATE` scaled to `size`, so eyes and mouth land at the same crop place for everyone.

    landmarks: (T, 68, 2) or (68, 2) float32 frame px.
    Returns (T, 2, 3) float32 (or (2, 3) for a single face): crop = M @ [x, y, 1].
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    single = landmarks.ndim == 2
    landmarks = landmarks[None] if single else landmarks
    if landmarks.shape[1:] != (68, 2):
        raise ValueError(f"expected landmarks (T, 68, 2), got {landmarks.shape}")
    target = CROP_TEMPLATE[ALIGNMENT_POINTS].astype(np.float64) * (size / CROP_SIZE)
    matrices = np.stack([_similarity(lm[ALIGNMENT_POINTS], target) for lm in landmarks])
    matrices = matrices.astype(np.float32)
    return matrices[0] if single else matrices


def transform_points(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine `M` to points (..., 2); returns (..., 2) float32.

    `M` may also be a stack (..., 2, 3) that broadcasts against the points' leading axes, e.g.
    landmarks (T, 68, 2) with transforms `M[:, None]` of shape (T, 1, 2, 3).
    """
    points = np.asarray(points, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)
    return (np.einsum("...ij,...j->...i", M[..., :2], points) + M[..., 2]).astype(np.float32)


def invert_transform(M: np.ndarray) -> np.ndarray:
    """(2, 3) float32 inverse of a (2, 3) affine transform."""
    return cv2.invertAffineTransform(np.asarray(M, dtype=np.float64)).astype(np.float32)


def warp_to_crop(frame: np.ndarray, M: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The (size, size, 3) uint8 crop of `frame` (H, W, 3) uint8 under the (2, 3) transform `M`.

    Large frames are first halved with a Gaussian pyramid while the transform shrinks by more
    than 2, so the crop is not aliased. Outside the frame, edge pixels are repeated.
    """
    M = np.asarray(M, dtype=np.float64).copy()
    image = frame
    while np.sqrt(abs(np.linalg.det(M[:, :2]))) < 0.5 and min(image.shape[:2]) > 2 * size:
        image = cv2.pyrDown(image)
        M[:, :2] *= 2.0
    return cv2.warpAffine(
        image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def mouth_mask(
    crop_landmarks: np.ndarray,
    size: int = CROP_SIZE,
    dilate_px: int = 20,
    feather_px: int = 16,
) -> np.ndarray:
    """The region diffusion repaints: the lower face from below the nose to the chin.

    A polygon along the jaw (points 2-14) closed by the base of the nose (points 31-35),
    dilated by `dilate_px` (room for a jaw that opens wider than in the identity frame) and
    feathered with a Gaussian of standard deviation `feather_px / 2`. The mask is forced to 0
    within `feather_px` of the crop border, so that paste-back never shows the crop's edge.

    crop_landmarks: (68, 2) float32 crop px. Returns (size, size) float32 in [0, 1].
    """
    points = np.asarray(crop_landmarks, dtype=np.float64)
    polygon = np.concatenate([points[2:15], points[NOSE_BASE][::-1]])
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        mask = cv2.dilate(mask, kernel)
    mask = mask.astype(np.float32) / 255.0
    if feather_px > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather_px / 2.0)
    ramp = np.clip((np.minimum(np.arange(size), np.arange(size)[::-1]) - 1) / max(feather_px, 1), 0, 1)
    mask *= np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)
    mask[mask < 1e-3] = 0.0
    return np.clip(mask, 0.0, 1.0)
