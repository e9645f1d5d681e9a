"""CLIP embed stage: structure, negative and identity embeddings with tiny checkpoints."""

import numpy as np
import pytest
import torch

from freetalk_core import clip_embed
from freetalk_core.errors import ModelFileError
from freetalk_core.models import layout

HIDDEN = layout.TINY_CLIP_VISION_CONFIG["hidden_size"]


@pytest.fixture(scope="module")
def encoder(tiny_models_anywhere):
    return clip_embed.load_image_encoder(tiny_models_anywhere)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (5, 512, 512, 3), dtype=np.uint8)


def test_structure_embeddings_shape_and_batching(encoder, frames):
    embeds = clip_embed.structure_embeddings(encoder, frames)
    assert embeds.shape == (5, 257, HIDDEN) and embeds.dtype == np.float32
    in_twos = clip_embed.structure_embeddings(encoder, frames, batch_size=2)
    np.testing.assert_allclose(in_twos, embeds, atol=1e-5)
    assert np.abs(embeds[0] - embeds[1]).max() > 1e-3


def test_structure_embeddings_are_the_penultimate_hidden_states(encoder, frames):
    pixel_values = encoder.processor(images=list(frames[:1]), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = encoder.model(pixel_values, output_hidden_states=True)
    expected = out.hidden_states[-2][0].numpy()
    np.testing.assert_allclose(clip_embed.structure_embeddings(encoder, frames[:1])[0], expected, atol=1e-5)
    # not the last layer
    assert np.abs(out.hidden_states[-1][0].numpy() - expected).max() > 1e-3


def test_negative_embedding_is_a_zero_input_tensor(encoder):
    negative = clip_embed.negative_embedding(encoder)
    assert negative.shape == (257, HIDDEN) and negative.dtype == np.float32
    with torch.no_grad():
        expected = encoder.model(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2][0]
    np.testing.assert_array_equal(negative, expected.numpy())


def test_missing_image_encoder_is_a_model_file_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelFileError, match="image_encoder"):
        clip_embed.load_image_encoder(tmp_path)


def test_five_keypoints_from_ibug68():
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[36:42] = [100, 200]
    landmarks[42:48] = [300, 202]
    landmarks[30] = [200, 300]
    landmarks[48] = [130, 400]
    landmarks[54] = [270, 400]
    np.testing.assert_array_equal(
        clip_embed.five_keypoints(landmarks), [[100, 200], [300, 202], [200, 300], [130, 400], [270, 400]]
    )
    assert clip_embed.five_keypoints(np.zeros((3, 68, 2))).shape == (3, 5, 2)


def _face_landmarks(shift=(0.0, 0.0)):
    """iBUG-68 points of a frontal face in a 512 crop, only the five ArcFace groups matter."""
    landmarks = np.full((68, 2), 256.0, np.float32)
    landmarks[36:42] = [190, 220]
    landmarks[42:48] = [322, 220]
    landmarks[30] = [256, 290]
    landmarks[48] = [200, 360]
    landmarks[54] = [312, 360]
    return landmarks + np.float32(shift)


def test_identity_embedding_is_mean_of_normalised_arcface(tiny_models_anywhere, frames):
    arcface = clip_embed.load_arcface(tiny_models_anywhere)
    landmarks = np.stack([_face_landmarks()] * 3)
    z = clip_embed.identity_embedding(arcface, frames[:3], landmarks)
    assert z.shape == (512,) and z.dtype == np.float32
    singles = [clip_embed.identity_embedding(arcface, frames[i : i + 1], landmarks[:1]) for i in range(3)]
    for single in singles:
        assert abs(np.linalg.norm(single) - 1.0) < 1e-5
    np.testing.assert_allclose(z, np.mean(singles, axis=0), atol=1e-6)
    assert np.linalg.norm(z) < 1.0  # different faces do not average to a unit vector


def test_identity_embedding_follows_the_landmarks(tiny_models_anywhere):
    """The same face moved inside the crop gives the same embedding when its landmarks move
    with it (alignment by the five keypoints), and a different one when they do not."""
    arcface = clip_embed.load_arcface(tiny_models_anywhere)
    rng = np.random.default_rng(2)
    crop = np.zeros((512, 512, 3), np.uint8)
    crop[100:420, 100:420] = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    moved = np.roll(crop, (12, -20), axis=(0, 1))
    base = clip_embed.identity_embedding(arcface, crop[None], _face_landmarks()[None])
    aligned = clip_embed.identity_embedding(arcface, moved[None], _face_landmarks((-20, 12))[None])
    unaligned = clip_embed.identity_embedding(arcface, moved[None], _face_landmarks()[None])
    assert np.abs(base - aligned).max() < 1e-4
    assert np.abs(base - unaligned).max() > 1e-2


def test_frames_without_landmarks_are_left_out(tiny_models_anywhere, frames):
    from freetalk_core.errors import NoFaceError

    arcface = clip_embed.load_arcface(tiny_models_anywhere)
    landmarks = np.stack([_face_landmarks()] * 3)
    landmarks[1] = np.nan
    z = clip_embed.identity_embedding(arcface, frames[:3], landmarks)
    expected = clip_embed.identity_embedding(arcface, frames[[0, 2]], landmarks[[0, 2]])
    np.testing.assert_allclose(z, expected, atol=1e-6)
    with pytest.raises(NoFaceError):
        clip_embed.identity_embedding(arcface, frames[:1], np.full((1, 68, 2), np.nan, np.float32))


def test_bad_inputs_are_rejected(encoder, tiny_models_anywhere):
    with pytest.raises(ValueError, match="uint8"):
        clip_embed.structure_embeddings(encoder, np.zeros((1, 512, 512, 3), np.float32))
    arcface = clip_embed.load_arcface(tiny_models_anywhere)
    with pytest.raises(ValueError, match="landmarks"):
        clip_embed.identity_embedding(arcface, np.zeros((2, 512, 512, 3), np.uint8), np.zeros((1, 68, 2)))
