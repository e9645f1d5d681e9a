import numpy as np
import pytest
from conftest import decode

from freetalk_core.errors import ModelFileError
from freetalk_core.face_crop import (
    LandmarkDetector,
    crop_transforms,
    fill_and_smooth,
    track_landmarks,
    transform_points,
)
from freetalk_core.fit_3dmm import (
    FitResult,
    fit_frame_vertices,
    fit_landmarks,
    identity_shape,
    load_face_model,
    smooth_fit,
)


def crop_landmarks(path, n):
    landmarks, found = track_landmarks(decode(path, n), LandmarkDetector())
    landmarks, _ = fill_and_smooth(landmarks, found)
    return transform_points(landmarks, crop_transforms(landmarks)[:, None])


@pytest.fixture(scope="module")
def model(eos_dir):
    return load_face_model(eos_dir)


@pytest.fixture(scope="module")
def may(samples_dir, model):
    landmarks = crop_landmarks(samples_dir / "MimicTalk__May_5s.mp4", 12)
    return landmarks, fit_landmarks(model, landmarks)


def test_load_face_model_has_blendshapes_and_the_ibug_mapping(model):
    assert model.mean.shape == (3448, 3)
    assert model.shape_basis.shape == (3448, 3, 63)
    assert model.blendshapes.shape == (6, 3448, 3)
    assert model.uv.shape == (3448, 2) and 0 <= model.uv.min() and model.uv.max() <= 1
    # ibug_to_sfm.txt maps the chin (landmark 9, 1-based) to vertex 33, and all 12 outer lip
    # points but not the inner lip corners (61 and 65, 1-based).
    assert model.landmark_vertex[8] == 33
    assert (model.landmark_vertex[48:60] >= 0).all()
    assert model.landmark_vertex[60] == -1 and model.landmark_vertex[64] == -1


def test_load_face_model_names_the_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="sfm_shape_3448.bin"):
        load_face_model(tmp_path)


def test_fit_error_is_a_few_pixels_on_real_frames(may):
    landmarks, fit = may
    assert isinstance(fit, FitResult) and len(fit) == len(landmarks)
    assert fit.shape_coeffs.shape == (12, 63) and fit.expression_coeffs.shape == (12, 6)
    assert fit.rotation.shape == (12, 3, 3) and fit.modelview.shape == (12, 4, 4)
    inter_ocular = np.linalg.norm(landmarks[:, 36:42].mean(1) - landmarks[:, 42:48].mean(1), axis=1)
    # Measured 3.8% of the inter-ocular distance; a wrong (0-based) landmark naming gives > 20%.
    assert (fit.fit_error / inter_ocular < 0.06).all(), fit.fit_error
    assert np.isfinite(fit.fit_error).all() and (fit.fit_error > 0).all()


def test_projected_mesh_lands_on_the_face(model, may):
    landmarks, fit = may
    projected = fit_frame_vertices(model, fit, 0)
    lips = model.landmark_vertex[48:60]
    # The lips are fitted loosest (the blendshapes barely move them): about 5 px here.
    assert np.linalg.norm(projected[lips, :2] - landmarks[0, 48:60], axis=1).mean() < 8.0
    chin = projected[model.landmark_vertex[8], :2]
    assert np.linalg.norm(chin - landmarks[0, 8]) < 12.0
    # The nose tip is nearer the camera than the eyes' outer corners.
    lv = model.landmark_vertex
    assert projected[lv[30], 2] > projected[lv[36], 2]


def test_identity_shape_ignores_a_bad_frame(may):
    _, fit = may
    shape = identity_shape(fit)
    assert shape.shape == (63,) and shape.dtype == np.float32
    spoiled = FitResult(**{**fit.__dict__})
    spoiled.shape_coeffs = fit.shape_coeffs.copy()
    spoiled.fit_error = fit.fit_error.copy()
    spoiled.shape_coeffs[3] += 50.0
    spoiled.fit_error[3] = 100.0
    np.testing.assert_allclose(identity_shape(spoiled), shape, atol=np.abs(shape).max() * 0.2 + 1e-3)
    # One estimate for the clip: nearer every frame's fit than the frames are to each other.
    spread = np.abs(fit.shape_coeffs - fit.shape_coeffs.mean(0)).mean()
    assert np.abs(shape - np.median(fit.shape_coeffs, 0)).mean() <= spread


def _rotation(yaw, pitch, roll):
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def _synthetic_fit(yaw, expression, offset_x):
    """A FitResult whose camera turns by `yaw` (T,) radians and moves by `offset_x` (T,)."""
    n = len(yaw)
    modelview = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    modelview[:, :3, :3] = [_rotation(a, 0.1, -0.05) for a in yaw]
    modelview[:, 0, 3] = offset_x
    projection = np.tile(np.diag([1 / 120, 1 / 120, -1 / 200, 1]).astype(np.float32), (n, 1, 1))
    return FitResult(
        shape_coeffs=np.zeros((n, 63), np.float32), expression_coeffs=expression.astype(np.float32),
        rotation=modelview[:, :3, :3].copy(), scale=np.ones(n, np.float32),
        translation=np.zeros((n, 2), np.float32), modelview=modelview, projection=projection,
        fit_error=np.ones(n, np.float32))


def test_smooth_fit_keeps_steady_motion_and_removes_jitter():
    rng = np.random.default_rng(0)
    t = np.arange(60, dtype=np.float64)
    yaw = 0.3 * np.sin(t / 12)  # a head turning to and fro
    expression = np.stack([0.5 * np.sin(t / 6 + k) for k in range(6)], axis=1)
    offset = 10 + 0.2 * t
    clean = _synthetic_fit(0.004 * t, 0.01 * t[:, None] * np.ones(6), offset)
    # Linear motion passes through unchanged: no lag.
    smoothed = smooth_fit(clean, 5)
    np.testing.assert_allclose(smoothed.modelview, clean.modelview, atol=2e-5)
    np.testing.assert_allclose(smoothed.expression_coeffs, clean.expression_coeffs, atol=1e-5)

    truth = _synthetic_fit(yaw, expression, offset)
    noisy = _synthetic_fit(yaw + rng.normal(0, 0.02, len(t)), expression + rng.normal(0, 0.1, expression.shape),
                           offset + rng.normal(0, 0.5, len(t)))
    smoothed = smooth_fit(noisy, 5)
    # Still rotations.
    np.testing.assert_allclose(smoothed.rotation @ smoothed.rotation.transpose(0, 2, 1),
                               np.tile(np.eye(3), (len(t), 1, 1)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(smoothed.rotation), 1.0, atol=1e-5)
    for name in ("rotation", "expression_coeffs"):
        before = np.abs(getattr(noisy, name) - getattr(truth, name)).mean()
        after = np.abs(getattr(smoothed, name) - getattr(truth, name)).mean()
        assert after < 0.85 * before, (name, before, after)
    before = np.abs(noisy.modelview[:, 0, 3] - offset).mean()
    assert np.abs(smoothed.modelview[:, 0, 3] - offset).mean() < 0.85 * before
    # Peaks keep their timing: the smoothed yaw peaks where the true one does.
    smoothed_yaw = np.arctan2(smoothed.rotation[:, 0, 2], smoothed.rotation[:, 2, 2])
    true_yaw = np.arctan2(truth.rotation[:, 0, 2], truth.rotation[:, 2, 2])
    assert abs(int(np.argmax(smoothed_yaw)) - int(np.argmax(true_yaw))) <= 1


def test_fit_landmarks_smooths_pose_by_default(may, model):
    landmarks, fit = may
    raw = fit_landmarks(model, landmarks, smooth_window=1)
    assert fit.fit_error.shape == raw.fit_error.shape
    # The smoothed pose still lands on the landmarks within a few pixels of the raw fits.
    assert fit.fit_error.mean() < raw.fit_error.mean() + 1.0
    # and it moves less from frame to frame.
    def jerk(f):
        return np.abs(np.diff(f.modelview[:, :3, :3], n=2, axis=0)).mean()
    assert jerk(fit) <= jerk(raw)
