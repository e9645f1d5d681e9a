import av
import cv2
import numpy as np
import pytest
from conftest import decode

from freetalk_core.errors import NoFaceError
from freetalk_core.face_crop import (
    CROP_TEMPLATE,
    MIRRORED_POINTS,
    LandmarkDetector,
    crop_transforms,
    fill_and_smooth,
    invert_transform,
    mouth_mask,
    track_landmarks,
    transform_points,
    warp_to_crop,
)
from freetalk_core.paste_back import paste_back

# Template positions the crop promises (see CROP_TEMPLATE's docstring).
LEFT_EYE_AT = np.array([196.0, 215.0])
RIGHT_EYE_AT = np.array([316.0, 215.0])
MOUTH_AT = np.array([256.0, 350.0])


def inter_ocular(landmarks):
    return float(np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0)))


@pytest.fixture(scope="module")
def detector():
    return LandmarkDetector()


@pytest.fixture(scope="module")
def may_clip(samples_dir, detector):
    frames = list(decode(samples_dir / "MimicTalk__May_5s.mp4", 30))
    landmarks, found = track_landmarks(iter(frames), detector)
    return frames, landmarks, found


def test_detect_finds_plausible_landmarks_on_sample_frames(samples_dir, detector):
    for name in ["MimicTalk__May_5s.mp4", "SadTalker__WDA_KatieHill_000.mp4", "LipNet__bbaf2n.mpg"]:
        frame = next(decode(samples_dir / name, 1))
        landmarks = detector.detect(frame)
        assert landmarks is not None, name
        assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
        h, w = frame.shape[:2]
        assert (landmarks[:, 0] >= 0).all() and (landmarks[:, 0] < w).all()
        left_eye, right_eye = landmarks[36:42].mean(0), landmarks[42:48].mean(0)
        assert left_eye[0] < landmarks[30, 0] < right_eye[0]
        assert left_eye[1] < landmarks[33, 1] < landmarks[51, 1] < landmarks[57, 1] < landmarks[8, 1]
        assert inter_ocular(landmarks) > 0.1 * w


def test_mirrored_points_name_each_landmark_in_the_mirrored_face(samples_dir):
    plain = LandmarkDetector(predict_size=0.0, mirror=False)
    assert sorted(MIRRORED_POINTS) == list(range(68))
    np.testing.assert_array_equal(MIRRORED_POINTS[MIRRORED_POINTS], np.arange(68))
    for frame in decode(samples_dir / "MimicTalk__May_5s.mp4", 4):
        box = plain.detect_box(frame)
        right = frame.shape[1] - 1
        own = plain.predict(frame, box)
        mirrored = plain.predict(np.ascontiguousarray(frame[:, ::-1]), (right - box[2], box[1], right - box[0], box[3]))
        mirrored = mirrored[MIRRORED_POINTS]
        mirrored[:, 0] = right - mirrored[:, 0]
        assert np.linalg.norm(mirrored - own, axis=1).mean() < 0.04 * inter_ocular(own)


def test_small_faces_get_the_landmarks_of_the_full_size_face(samples_dir, detector):
    """A face shrunk to a quarter (a 64 px box): the lip points the detector finds are nearer
    those of the full-size face than the plain shape predictor's on the small face."""
    plain = LandmarkDetector(predict_size=0.0, mirror=False)
    errors = {"detector": [], "plain": []}
    for frame in decode(samples_dir / "MimicTalk__May_5s.mp4", 12):
        box = plain.detect_box(frame)
        full = plain.predict(frame, box)
        small = cv2.resize(frame, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
        for name, predictor in (("detector", detector), ("plain", plain)):
            # Pixel centres scale about the image's corner half a pixel out, as cv2.resize's.
            lips = (predictor.predict(small, (box + 0.5) * 0.25 - 0.5)[48:68] + 0.5) / 0.25 - 0.5
            errors[name].append(np.linalg.norm(lips - full[48:68], axis=1).mean() / inter_ocular(full))
    assert np.mean(errors["detector"]) < 0.75 * np.mean(errors["plain"])
    assert np.mean(errors["detector"]) < 0.012


def test_tracking_agrees_with_per_frame_detection(may_clip, detector):
    frames, landmarks, found = may_clip
    assert landmarks.shape == (30, 68, 2) and landmarks.dtype == np.float32
    assert found.all()
    for index in [1, 3, 8, 14, 22, 29]:
        detected = detector.detect(frames[index])
        error = np.abs(landmarks[index] - detected).mean() / inter_ocular(detected)
        assert error < 0.03, (index, error)


def test_tracking_drops_the_face_when_it_disappears(may_clip, detector):
    frames = may_clip[0][:10]
    blank = np.zeros_like(frames[0])
    _, found = track_landmarks((f for f in frames[:6] + [blank] * 4 + frames[6:]), detector)
    assert found.tolist() == [True] * 6 + [False] * 4 + [True] * 4


def test_crop_puts_eyes_and_mouth_at_the_template_positions(samples_dir, detector):
    for name in [
        "MimicTalk__May_5s.mp4",
        "SadTalker__WDA_AlexandriaOcasioCortez_000.mp4",
        "EDTalk__mouth_source.mp4",
    ]:
        landmarks, found = track_landmarks(decode(samples_dir / name, 10), detector)
        landmarks, passthrough = fill_and_smooth(landmarks, found)
        M = crop_transforms(landmarks)
        assert M.shape == (10, 2, 3) and M.dtype == np.float32
        crop_landmarks = transform_points(landmarks, M[:, None])
        assert np.abs(crop_landmarks[:, 36:42].mean(1) - LEFT_EYE_AT).max() < 12, name
        assert np.abs(crop_landmarks[:, 42:48].mean(1) - RIGHT_EYE_AT).max() < 12, name
        assert np.abs(crop_landmarks[:, 48:68].mean(1) - MOUTH_AT).max() < 20, name
        # The whole face, chin included, is inside the crop with a margin.
        assert crop_landmarks.min() > 40 and crop_landmarks.max() < 512 - 40, name


def test_crop_transform_is_a_similarity_that_recovers_a_known_one():
    angle, scale, shift = np.deg2rad(12.0), 0.7, np.array([40.0, -25.0])
    A = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Frame landmarks = inverse of a known crop transform applied to the template.
    frame_landmarks = (CROP_TEMPLATE - shift) @ np.linalg.inv(A).T
    M = crop_transforms(frame_landmarks[None])[0]
    np.testing.assert_allclose(M[:, :2], A, atol=1e-4)
    np.testing.assert_allclose(M[:, 2], shift, atol=1e-2)


def test_transform_round_trip_and_warp_follow_the_points():
    rng = np.random.default_rng(0)
    M = np.array([[0.8, -0.2, 30.0], [0.2, 0.8, -12.0]], np.float32)
    points = rng.uniform(0, 500, (7, 3, 2)).astype(np.float32)
    back = transform_points(transform_points(points, M), invert_transform(M))
    assert back.shape == points.shape
    np.testing.assert_allclose(back, points, atol=1e-3)

    frame = np.zeros((600, 700, 3), np.uint8)
    cv2.circle(frame, (350, 300), 6, (255, 255, 255), -1)
    crop = warp_to_crop(frame, M)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop[..., 0] > 127)
    expected = transform_points(np.array([350.0, 300.0]), M)
    np.testing.assert_allclose([xs.mean(), ys.mean()], expected, atol=1.0)


def test_mouth_mask_covers_the_lips_and_not_the_eyes(may_clip):
    _, landmarks, found = may_clip
    landmarks, _ = fill_and_smooth(landmarks, found)
    M = crop_transforms(landmarks)
    for crop_landmarks in [CROP_TEMPLATE, transform_points(landmarks[12], M[12])]:
        mask = mouth_mask(crop_landmarks)
        assert mask.shape == (512, 512) and mask.dtype == np.float32
        assert mask.min() >= 0 and mask.max() <= 1
        lips = np.round(crop_landmarks[48:68]).astype(int)
        assert (mask[lips[:, 1], lips[:, 0]] > 0.99).all()
        chin = np.round(crop_landmarks[8]).astype(int)
        assert mask[chin[1], chin[0]] > 0.5
        eyes = np.round(crop_landmarks[36:48]).astype(int)
        assert (mask[eyes[:, 1], eyes[:, 0]] == 0).all()
        brows_and_nose_bridge = np.round(crop_landmarks[17:29]).astype(int)
        assert (mask[brows_and_nose_bridge[:, 1], brows_and_nose_bridge[:, 0]] == 0).all()
        # Zero along the crop border, so paste-back never shows the crop's edge.
        assert mask[0].max() == mask[-1].max() == mask[:, 0].max() == mask[:, -1].max() == 0


def test_paste_back_changes_only_pixels_under_the_warped_mask():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (720, 900, 3), dtype=np.uint8)
    crop = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    M = np.array([[0.9, 0.15, -180.0], [-0.15, 0.9, -40.0]], np.float32)
    mask = mouth_mask(CROP_TEMPLATE)
    out = paste_back(frame, crop, M, mask)
    assert out.shape == frame.shape and out.dtype == np.uint8

    alpha = cv2.warpAffine(mask, M, (900, 720), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    outside = alpha == 0
    assert outside.mean() > 0.5 and (~outside).sum() > 10_000
    np.testing.assert_array_equal(out[outside], frame[outside])
    colour = cv2.warpAffine(crop, M, (900, 720), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    full = alpha > 0.999
    assert full.sum() > 5_000
    assert np.abs(out[full].astype(int) - colour[full].astype(int)).max() <= 1


def test_paste_back_with_a_full_mask_stops_at_the_crop_footprint():
    frame = np.full((400, 400, 3), 7, np.uint8)
    crop = np.full((512, 512, 3), 200, np.uint8)
    # The crop covers frame pixels 100.3 .. 356.3: its edges fall between pixels.
    M = np.array([[2.0, 0.0, -200.6], [0.0, 2.0, -200.6]], np.float32)
    out = paste_back(frame, crop, M, np.ones((512, 512), np.float32))
    outside = np.ones((400, 400), bool)
    outside[100:358, 100:358] = False
    np.testing.assert_array_equal(out[outside], 7)
    assert (out[102:355, 102:355] == 200).all()
    # At the crop's edge the frame blends with the crop's own colour, never with black.
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    alpha = cv2.warpAffine(np.ones((512, 512), np.float32), M, (400, 400), flags=flags)
    edge = (alpha > 0) & (alpha < 1)
    assert edge.sum() > 500
    expected = 7 * (1 - alpha[edge]) + 200 * alpha[edge]
    assert np.abs(out[edge][:, 0] - expected).max() <= 1


def test_paste_back_of_the_unchanged_crop_reproduces_the_frame(may_clip):
    frames, landmarks, found = may_clip
    landmarks, _ = fill_and_smooth(landmarks, found)
    M = crop_transforms(landmarks[5])
    crop = warp_to_crop(frames[5], M)
    mask = mouth_mask(transform_points(landmarks[5], M))
    out = paste_back(frames[5], crop, M, mask)
    diff = np.abs(out.astype(int) - frames[5].astype(int))
    # Resampling twice blurs a little; a wrong inverse would leave errors of tens of levels.
    assert diff.mean() < 1.0 and np.percentile(diff, 99.5) < 25


def test_fill_and_smooth_interpolates_bridged_gaps_and_passes_the_others_through():
    t = np.arange(60, dtype=np.float32)
    landmarks = np.zeros((60, 68, 2), np.float32)
    landmarks[..., 0] = (100 + 2 * t)[:, None]
    landmarks[..., 1] = 50.0
    found = np.ones(60, bool)
    found[10:14] = False  # bridged gap (the face is still there)
    found[30:50] = False  # not bridged
    bridged = np.zeros(60, bool)
    bridged[10:14] = True
    observed = np.where(found[:, None, None], landmarks, 0)
    filled, passthrough = fill_and_smooth(observed, found, bridged, window=5)
    assert filled.shape == (60, 68, 2) and filled.dtype == np.float32
    assert passthrough.tolist() == [False] * 30 + [True] * 20 + [False] * 10
    # Without bridged frames, every frame without a face passes through.
    assert fill_and_smooth(observed, found)[1].tolist() == (~found).tolist()
    # A straight-line track passes a centred filter unchanged: no lag.
    np.testing.assert_allclose(filled[:30], landmarks[:30], atol=1e-3)
    np.testing.assert_allclose(filled[52:58], landmarks[52:58], atol=1e-3)
    # Long-gap frames hold the nearest face, so they still have a crop transform.
    np.testing.assert_allclose(filled[30:40, 0, 0], landmarks[29, 0, 0], atol=1e-3)
    np.testing.assert_allclose(filled[40:50, 0, 0], landmarks[50, 0, 0], atol=1e-3)


def test_fill_and_smooth_reduces_jitter():
    rng = np.random.default_rng(2)
    truth = np.full((100, 68, 2), 200.0, np.float32)
    noisy = truth + rng.normal(0, 2.0, truth.shape).astype(np.float32)
    smoothed, _ = fill_and_smooth(noisy, np.ones(100, bool))
    assert np.std(smoothed - truth) < 0.8 * np.std(noisy - truth)


def test_fill_and_smooth_raises_when_no_frame_has_a_face():
    with pytest.raises(NoFaceError, match="no face found in lip.mp4: use a video where one face is visible"):
        fill_and_smooth(np.zeros((5, 68, 2), np.float32), np.zeros(5, bool), source="lip.mp4")


def test_blank_video_raises_no_face_error(tmp_path, detector):
    path = tmp_path / "blank.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for _ in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 90, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    landmarks, found = track_landmarks(decode(path, 100), detector)
    assert landmarks.shape == (8, 68, 2) and not found.any()
    with pytest.raises(NoFaceError, match="blank.mp4"):
        fill_and_smooth(landmarks, found, source=path.name)


def test_small_face_in_tall_video_is_found_in_every_frame(samples_dir, detector):
    landmarks, found = track_landmarks(decode(samples_dir / "LatentSync__demo1_video.mp4", 40), detector)
    assert landmarks.shape == (40, 68, 2)
    assert found.all()
    # The face is small in the 1080 x 1920 frame but the landmarks sit on it at full resolution.
    assert 60 < inter_ocular(landmarks[found][0]) < 200
    frame = next(decode(samples_dir / "LatentSync__demo1_video.mp4", 1))
    detected = detector.detect(frame)
    assert detected is not None
    assert np.abs(detected - landmarks[0]).mean() / inter_ocular(detected) < 0.03
