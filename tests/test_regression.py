"""Recorded slices: the diffusion frames, the structure frames and the Noise Sensor's filter on
fixed inputs (tiny random-weight models, fixed seeds), so a change that moves any of them shows.
A change meant to move them records new slices here, with the reason in its commit."""

import numpy as np
import pytest

from freetalk_core import diffusion, noise_sensor, video
from freetalk_core.face_crop import (
    LandmarkDetector,
    crop_transforms,
    fill_and_smooth,
    track_landmarks,
    transform_points,
    warp_to_crop,
)
from freetalk_core.fit_3dmm import fit_landmarks, load_face_model
from freetalk_core.structure_render import render_structure_frames

STRUCTURE = [[[176.7, 114.0, 121.0], [119.7, 33.7, 37.0], [129.0, 63.7, 153.0]],
             [[173.0, 111.7, 125.7], [119.7, 31.3, 36.3], [129.3, 59.7, 153.7]],
             [[170.7, 108.7, 121.7], [119.0, 31.7, 31.7], [129.3, 59.3, 154.0]],
             [[175.0, 117.0, 121.0], [117.7, 36.3, 26.0], [129.7, 67.3, 154.3]],
             [[179.3, 126.7, 125.7], [119.0, 34.7, 25.0], [128.0, 60.7, 151.7]],
             [[179.0, 120.3, 123.3], [126.3, 35.7, 26.0], [128.3, 59.3, 141.0]]]
DIFFUSION = [[[72.3, 118.7, 116.0, 85.3], [120.7, 129.7, 140.3, 77.0], [104.7, 137.7, 100.3, 99.0],
              [100.7, 99.7, 129.7, 155.7]],
             [[75.3, 120.0, 113.7, 93.0], [121.7, 129.0, 140.0, 72.3], [105.3, 137.0, 101.3, 101.0],
              [102.3, 100.0, 130.0, 155.0]]]
FILTER = [[[179, 212, 102], [143, 175, 196], [23, 153, 151]], [[174, 78, 151], [167, 22, 124], [78, 143, 114]],
          [[89, 118, 152], [141, 195, 136], [54, 168, 85]], [[110, 116, 155], [159, 193, 198], [54, 127, 173]]]


@pytest.fixture(scope="module")
def pair(samples_dir):
    """Aligned crops and crop landmarks of the first 6 frames of two people."""
    detector, out = LandmarkDetector(), []
    for name in ("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"):
        frames = video.read_video(samples_dir / name, fps=25.0, max_frames=6)
        landmarks, found = track_landmarks(iter(frames), detector)
        landmarks, _ = fill_and_smooth(landmarks, found)
        transforms = crop_transforms(landmarks)
        out.append((np.stack([warp_to_crop(f, m) for f, m in zip(frames, transforms)]),
                    transform_points(landmarks, transforms[:, None])))
    return out


def test_structure_frames_slice(pair, eos_dir):
    (crops, landmarks), (_, lip_landmarks) = pair
    model = load_face_model(eos_dir)
    frames = render_structure_frames(model, crops, landmarks, fit_landmarks(model, landmarks), lip_landmarks)
    # 2 grey levels: the same code has read one pixel (frame 4, in the mouth) as 32.3 on one
    # machine and 33.3 on another (a 2-core AMD EPYC, where these were recorded); the rest
    # agree within 1.
    np.testing.assert_allclose(frames[:, 300:420:40, 200:320:40].mean(axis=-1), STRUCTURE, atol=2.0)


def test_diffusion_frames_slice(pair, tiny_models):
    crops = pair[0][0][:2]
    pipe = diffusion.load_pipeline(tiny_models)
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 512, 512), np.float32)
    masks[:, 300:420, 190:330] = 1
    structure = rng.standard_normal((2, 257, 32)).astype(np.float32)
    negative = rng.standard_normal((257, 32)).astype(np.float32)
    identity = rng.standard_normal(512).astype(np.float32)
    out = diffusion.generate_frames(pipe, crops, masks, structure, negative, identity / np.linalg.norm(identity),
                                    diffusion.initial_noise(42), steps=4)
    np.testing.assert_allclose(out[:, 320:420:25, 210:330:30].mean(axis=-1), DIFFUSION, atol=2.0)


def test_noise_filter_slice():
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    pattern = rng.uniform(0.2, 2.0, (16, 16)).astype(np.float32)
    motion = rng.normal(0, 0.7, (7, 16, 16, 2)).astype(np.float32)
    filtered = noise_sensor.temporal_filter(clip, pattern, 5, motion=motion)
    np.testing.assert_allclose(filtered[2:6, 4:12:3, 5:13:3, 0], FILTER, atol=1)
