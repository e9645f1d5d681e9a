"""The structure embedding follows the lip motion: its distance from the anchor frame rises and
falls with the lip opening (tiny random-weight image encoder; the bench runs the real one)."""

from dataclasses import replace

import numpy as np
import pytest

from freetalk_core import face_crop
from freetalk_core.clip_embed import embedding_follows_lips, load_image_encoder, structure_embeddings
from freetalk_core.fit_3dmm import fit_landmarks, load_face_model
from freetalk_core.lips import lip_distance
from freetalk_core.structure_render import render_structure_frames
from freetalk_core.video import read_video

N_FRAMES = 30


def test_embedding_follows_lips_measures_distance_from_the_closed_frame():
    rng = np.random.default_rng(0)
    landmarks = np.tile(rng.uniform(100, 400, (1, 68, 2)), (12, 1, 1)).astype(np.float32)
    landmarks[:, 36:42] = [100, 200]
    landmarks[:, 42:48] = [220, 200]
    opening = np.array([2, 3, 5, 8, 12, 9, 6, 4, 3, 5, 7, 4], np.float32)
    landmarks[:, [56, 57, 58], 1] = landmarks[:, [52, 51, 50], 1] + opening[:, None]
    h = lip_distance(landmarks)  # the controller's smoothed opening
    embeddings = 0.5 + h[:, None, None] * rng.standard_normal((257, 8))
    assert embedding_follows_lips(embeddings, landmarks) > 0.99
    assert np.isnan(embedding_follows_lips(np.ones((12, 257, 8)), landmarks))
    with pytest.raises(ValueError):
        embedding_follows_lips(embeddings[:5], landmarks)


def _crops(path, n):
    frames = read_video(path, max_frames=n)
    landmarks, found = face_crop.track_landmarks(iter(frames), face_crop.LandmarkDetector())
    landmarks, _ = face_crop.fill_and_smooth(landmarks, found)
    transforms = face_crop.crop_transforms(landmarks)
    return (np.stack([face_crop.warp_to_crop(f, m) for f, m in zip(frames, transforms)]),
            face_crop.transform_points(landmarks, transforms[:, None]))


def test_structure_embedding_follows_the_lip_reference(samples_dir, eos_dir, tiny_models):
    # One identity frame held still, so only the mouth changes: the embedding's distance from
    # the anchor follows the lip reference's opening, and stops following it when the same
    # mouths come in another order.
    crops, landmarks = _crops(samples_dir / "SadTalker__RD_Radio2_000.mp4", 1)
    _, lip_landmarks = _crops(samples_dir / "VideoRetalking__face_2.mp4", N_FRAMES)
    model = load_face_model(eos_dir)
    fit = fit_landmarks(model, landmarks)
    fit = replace(fit, **{k: np.repeat(v, N_FRAMES, 0) for k, v in fit.__dict__.items() if isinstance(v, np.ndarray)})
    crops, landmarks = np.repeat(crops, N_FRAMES, 0), np.repeat(landmarks, N_FRAMES, 0)
    encoder = load_image_encoder(tiny_models)
    order = np.random.default_rng(0).permutation(N_FRAMES)
    follows = embedding_follows_lips(structure_embeddings(
        encoder, render_structure_frames(model, crops, landmarks, fit, lip_landmarks)), lip_landmarks)
    shuffled = embedding_follows_lips(structure_embeddings(
        encoder, render_structure_frames(model, crops, landmarks, fit, lip_landmarks[order])), lip_landmarks)
    # Measured: 0.91 in order, 0.10 shuffled.
    assert follows > 0.7
    assert shuffled < follows - 0.4
