import av
import numpy as np
import pytest

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
)


def decode(path, n):
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= n:
                return
            yield frame.to_ndarray(format="rgb24")


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
