"""Faces in real-world clips: cut-aways, detector misses, two faces, a small face in a tall frame."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from freetalk_core import video
from freetalk_core.face_crop import (
    LandmarkDetector,
    bridge_gaps,
    choose_face,
    fill_and_smooth,
    gap_frame_indices,
    shot_change,
    track_landmarks,
)


@pytest.fixture(scope="module")
def detector():
    return LandmarkDetector()


@pytest.fixture(scope="module")
def may_frames(samples_dir):
    return list(video.read_video(samples_dir / "MimicTalk__May_5s.mp4", max_frames=30))


def _bridge(frames, landmarks, found):
    wanted = gap_frame_indices(found)
    return bridge_gaps(landmarks, found, (frames[i] for i in wanted))


def test_black_frames_at_the_start_of_a_clip_are_passed_through(may_frames, detector):
    frames = [np.zeros_like(may_frames[0])] * 4 + may_frames[:8]
    landmarks, found = track_landmarks(iter(frames), detector)
    assert found.tolist() == [False] * 4 + [True] * 8
    bridged = _bridge(frames, landmarks, found)
    assert fill_and_smooth(landmarks, found, bridged)[1].tolist() == [True] * 4 + [False] * 8


def test_black_cut_away_is_passed_through(may_frames, detector):
    black = np.zeros_like(may_frames[0])
    frames = may_frames[:10] + [black] * 10 + may_frames[10:20]
    landmarks, found = track_landmarks(iter(frames), detector)
    assert found.tolist() == [True] * 10 + [False] * 10 + [True] * 10
    bridged = _bridge(frames, landmarks, found)
    assert not bridged.any()
    _, passthrough = fill_and_smooth(landmarks, found, bridged)
    assert passthrough.tolist() == [False] * 10 + [True] * 10 + [False] * 10


def test_cut_away_to_another_shot_is_passed_through(may_frames, detector, samples_dir):
    # A shot of something else: the background of another clip, enlarged to the frame.
    other = video.read_video(samples_dir / "VideoRetalking__face_2.mp4", max_frames=10)
    h, w = may_frames[0].shape[:2]
    scene = [cv2.resize(f[:200, :200], (w, h), interpolation=cv2.INTER_LINEAR) for f in other]
    assert all(detector.detect_box(f) is None for f in scene[:3])
    frames = may_frames[:10] + scene + may_frames[10:20]
    landmarks, found = track_landmarks(iter(frames), detector)
    assert not found[10:20].any() and found[:10].all() and found[20:].all()
    bridged = _bridge(frames, landmarks, found)
    assert not bridged.any()
    assert fill_and_smooth(landmarks, found, bridged)[1][10:20].all()


def test_shot_change_separates_cuts_from_ordinary_frames(may_frames):
    ordinary = [shot_change(a, b) for a, b in zip(may_frames[:-1], may_frames[1:])]
    assert max(ordinary) < 0.1
    assert shot_change(may_frames[0], np.zeros_like(may_frames[0])) > 0.5


def test_missed_face_under_blur_or_a_passing_hand_is_bridged(may_frames, detector):
    frames = [f.copy() for f in may_frames[:24]]
    landmarks, found = track_landmarks(iter(frames), detector)
    assert found.all()
    # The face is still there, blurred on frames 8-11 and behind a skin-coloured patch over
    # the mouth on frames 12-15; the detector is made to miss all eight.
    for t in range(8, 12):
        frames[t] = cv2.GaussianBlur(frames[t], (0, 0), 4)
    for t in range(12, 16):
        mouth = landmarks[t, 48:68]
        x0, y0 = (mouth.min(0) - 10).astype(int)
        x1, y1 = (mouth.max(0) + 10).astype(int)
        frames[t][y0:y1, x0:x1] = (200, 150, 130)
    missed = found.copy()
    missed[8:16] = False
    observed = np.where(missed[:, None, None], landmarks, 0)
    bridged = _bridge(frames, observed, missed)
    assert bridged.tolist() == [False] * 8 + [True] * 8 + [False] * 8
    filled, passthrough = fill_and_smooth(observed, missed, bridged)
    assert not passthrough.any()
    # The bridged track stays on the face.
    iod = np.linalg.norm(landmarks[0, 36:42].mean(0) - landmarks[0, 42:48].mean(0))
    assert np.abs(filled[8:16] - landmarks[8:16]).mean() < 0.1 * iod


def test_a_gap_longer_than_max_gap_is_never_bridged(may_frames, detector):
    frames = may_frames[:30]
    landmarks, found = track_landmarks(iter(frames), detector)
    missed = found.copy()
    missed[5:25] = False
    assert gap_frame_indices(missed, max_gap=12).size == 0
    assert not bridge_gaps(landmarks, missed, iter([]), max_gap=12).any()


def test_choose_face_by_size_or_by_box():
    boxes = np.array([[0, 0, 50, 50], [100, 0, 200, 100], [300, 0, 370, 70]], float)
    assert choose_face(boxes) == 1
    assert choose_face(boxes, face_index=1) == 2
    assert choose_face(boxes, face_index=2) == 0
    assert choose_face(boxes, face_index=3) is None
    assert choose_face(boxes, face_box=(290, 10, 360, 80)) == 2
    assert choose_face(boxes, face_box=(500, 500, 600, 600)) is None
    assert choose_face(np.zeros((0, 4))) is None


def two_faces(samples_dir, n):
    """`n` frames 640 x 384: May (320 px) on the left, Katie Hill (224 px) on the right."""
    may = video.read_video(samples_dir / "MimicTalk__May_5s.mp4", max_frames=n)
    katie = video.read_video(samples_dir / "SadTalker__WDA_KatieHill_000.mp4", max_frames=n)
    out = np.full((n, 384, 640, 3), 40, np.uint8)
    for t in range(n):
        out[t, 32:352, 0:320] = cv2.resize(may[t], (320, 320), interpolation=cv2.INTER_AREA)
        out[t, 80:304, 384:608] = cv2.resize(katie[t], (224, 224), interpolation=cv2.INTER_AREA)
    return out


def test_two_faces_largest_by_default_else_as_chosen(samples_dir, detector):
    frames = two_faces(samples_dir, 8)
    centre = lambda lm: lm[:, 27:36].mean(axis=(0, 1))  # noqa: E731
    largest, found = track_landmarks(iter(frames), detector)
    assert found.all() and centre(largest)[0] < 320
    second, found = track_landmarks(iter(frames), detector, face_index=1)
    assert found.all() and centre(second)[0] > 384
    boxed, found = track_landmarks(iter(frames), detector, face_box=(380, 70, 610, 310))
    assert found.all() and centre(boxed)[0] > 384


def test_small_face_in_a_tall_frame_is_found_on_every_frame_and_pasted_back_without_a_seam(
        samples_dir, detector):
    path = samples_dir / "LatentSync__demo1_video.mp4"
    frames = video.read_video(path, max_frames=15)
    assert frames.shape[1:3] == (1920, 1080)
    landmarks, found = track_landmarks(iter(frames), detector)
    assert found.all()
    from freetalk_core.face_crop import crop_transforms, mouth_mask, transform_points, warp_to_crop
    from freetalk_core.paste_back import paste_back

    smoothed, passthrough = fill_and_smooth(landmarks, found)
    assert not passthrough.any()
    transforms = crop_transforms(smoothed)
    for t in (0, 14):
        frame, M = frames[t], transforms[t]
        # The face is small: the eyes are under 100 px apart in the frame.
        assert 60 < np.linalg.norm(landmarks[t, 36:42].mean(0) - landmarks[t, 42:48].mean(0)) < 100
        crop_landmarks = transform_points(smoothed[t], M)
        mask = mouth_mask(crop_landmarks)
        crop = warp_to_crop(frame, M)
        # Unchanged crop: the frame comes back (two resamplings blur a little).
        unchanged = paste_back(frame, crop, M, mask).astype(int)
        same = np.abs(unchanged - frame.astype(int)).max(axis=-1)
        alpha = cv2.warpAffine(mask, M, frame.shape[1::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        assert (alpha > 0).sum() > 5_000
        assert same[alpha > 0].mean() < 1.0 and np.percentile(same[alpha > 0], 99.5) < 8
        # A crop 40 levels brighter: the change rises over several frame pixels, never in one
        # step, and lands on the lips, not on the eyes.
        brighter = np.clip(crop.astype(int) + 40, 0, 255).astype(np.uint8)
        change = (paste_back(frame, brighter, M, mask).astype(int) - unchanged).mean(axis=-1)
        valid = cv2.erode((frame.max(axis=-1) < 200).astype(np.uint8), np.ones((5, 5))) > 0  # room for +40
        step = np.maximum(np.abs(np.diff(change, axis=0))[valid[1:] & valid[:-1]].max(),
                          np.abs(np.diff(change, axis=1))[valid[:, 1:] & valid[:, :-1]].max())
        assert step <= 10, (t, step)
        lips = np.round(landmarks[t, 48:68]).astype(int)
        assert (change[lips[:, 1], lips[:, 0]] > 35).all()
        eyes = np.round(landmarks[t, 36:48]).astype(int)
        assert (change[eyes[:, 1], eyes[:, 0]] == 0).all()


@pytest.fixture(scope="module")
def cut_away_two_faces_run(tmp_path_factory, tiny_models, samples_dir):
    """`generate` on a two-face identity (1 s) with 10 black frames at 8-17, tiny models."""
    from flows.generate import generate_to, make_job
    from flows.runtime import configure_environment, store_settings

    folder = tmp_path_factory.mktemp("faces")
    frames = two_faces(samples_dir, 25)
    frames[8:18] = 0
    identity = folder / "two_faces_cut_away.mp4"
    video.write_video(identity, iter(frames), 25.0)
    lip_source = samples_dir / "SadTalker__WDA_KatieHill_000.mp4"
    lip_ref = folder / "lip.mp4"
    video.write_video(lip_ref, iter(video.read_video(lip_source, max_frames=25)), 25.0, audio=lip_source)
    # Unmarked: the invisible watermark changes every pixel by a few levels, which would hide
    # what this checks.
    job = make_job(identity, lip_ref, store=folder / "store", models=tiny_models, steps=2, batch_size=4,
                   chunk_frames=10, mark=False)
    configure_environment()
    with store_settings(Path(job.store)):
        out = generate_to(job, folder / "out.mp4")
    # What one more pass through the encoder alone changes: the tolerance for untouched pixels.
    decoded = video.read_video(identity)
    video.write_video(folder / "again.mp4", iter(decoded), 25.0)
    return job, decoded, video.read_video(out), video.read_video(folder / "again.mp4")


def test_cut_away_frames_and_the_other_face_come_out_untouched(cut_away_two_faces_run):
    from storage import Store, arrays

    job, identity, output, again = cut_away_two_faces_run
    assert output.shape == identity.shape == (25, 384, 640, 3)
    passthrough = Store(job.store).read(job.item_id, arrays.IDENTITY_PASSTHROUGH)
    assert passthrough.tolist() == [False] * 8 + [True] * 10 + [False] * 7
    diff = np.abs(output.astype(int) - identity.astype(int))
    codec = np.abs(again.astype(int) - identity.astype(int))
    # The black frames stay black (the output went through the encoder once more).
    assert diff[8:18].max() <= max(codec[8:18].max(), 4) and output[8:18].mean() < 1
    faces = np.r_[0:8, 18:25]
    # The other (smaller) face is untouched: changed no more than by the encoder.
    other, other_codec = diff[faces, 80:304, 384:608], codec[faces, 80:304, 384:608]
    assert other.mean() <= other_codec.mean() + 0.75, (other.mean(), other_codec.mean())
    assert np.percentile(other, 99.9) <= np.percentile(other_codec, 99.9) + 8
    # The largest face got the generated mouth.
    assert diff[faces, 210:320, 100:220].mean() > 5 * other.mean()


def test_face_options_on_generate_and_dataset_reach_the_face_crop_key(tmp_path, tiny_models):
    import inspect

    import typer

    from flows.cli import app, generation_settings
    from flows.dataset import process_dataset
    from flows.generate import generate_pair, make_job, stage_keys

    command = typer.main.get_command(app)
    for name in ("generate", "dataset"):
        options = {p.name for p in command.commands[name].params}
        assert {"face_index", "face_box", "detector"} <= options, name
    for flow in (process_dataset, generate_pair):
        assert {"face_index", "face_box", "detector"} <= set(inspect.signature(flow.fn).parameters)
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    base = dict(steps=1, guidance=1.0, seed=0, batch_size=None, device="cpu", kernel_size=5,
                flow_reference="structure", filter_along_motion=True, noise_window=100,
                faceid_variant="plus", ip_scale=1.0, lambda_range=(0.5, 2.0))
    keys = []
    for face_index, face_box, detector in [(0, None, "dlib"), (1, None, "dlib"), (0, "10,20,110,140", "dlib"),
                                           (0, None, "insightface")]:
        settings = generation_settings(**base, face_index=face_index, face_box=face_box, detector=detector)
        job = make_job(a, b, store=tmp_path / "s", models=tiny_models, check=False, **{**settings, "fps": 25.0})
        assert (job.face_index, job.detector) == (face_index, detector)
        assert job.face_box == (None if face_box is None else (10.0, 20.0, 110.0, 140.0))
        keys.append(stage_keys(job))
    assert len({k["face_crop"] for k in keys}) == 4
    assert len({k["noise_filter"] for k in keys}) == 4  # everything downstream follows


@pytest.mark.parametrize("box", ["1,2,3", "10,10,5,20", "a,b,c,d"])
def test_cli_rejects_a_bad_face_box_in_one_line(tmp_path, box):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", "a.mp4", "b.mp4", "-o", str(tmp_path / "o.mp4"),
         "--store", str(tmp_path / "s"), "--face-box", box],
        capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--face-box must be x0,y0,x1,y1" in lines[0]


@pytest.fixture(scope="module")
def tiny_scrfd(tmp_path_factory):
    from freetalk_core.models import write_tiny_scrfd

    return write_tiny_scrfd(tmp_path_factory.mktemp("scrfd") / "insightface" / "det_10g.onnx")


def test_insightface_detector_reads_an_scrfd_onnx_and_gives_dlib_like_boxes(tiny_scrfd, may_frames):
    from freetalk_core.face_crop import DETECTORS, InsightFaceDetector, make_detector

    assert DETECTORS == ("dlib", "insightface")
    detector = make_detector("insightface", tiny_scrfd.parent.parent)
    assert isinstance(detector, InsightFaceDetector)
    frame = may_frames[0]
    boxes, scores = detector._detect_boxes(frame, 0)
    # Random weights: boxes anywhere, but in the format the rest reads, one per score.
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(scores) > 0
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (scores >= 0.5).all()
    # Square boxes, as dlib's: the keypoints are mapped through the crop template.
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], rtol=1e-6)
    box = detector.detect_box(frame)
    assert box is not None and detector.predict(frame, box).shape == (68, 2)


def test_insightface_keypoints_map_to_the_box_dlib_would_give(may_frames, detector):
    from freetalk_core.face_crop import LEFT_EYE, RIGHT_EYE, InsightFaceDetector

    frame = may_frames[0]
    dlib_box = detector.detect_box(frame)
    landmarks = detector.predict(frame, dlib_box)
    # What SCRFD would report for this face: its five keypoints, placed exactly.
    keypoints = np.stack([landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0), landmarks[30],
                          landmarks[48], landmarks[54]])

    class Exact:
        def detect(self, image, input_size):
            return np.array([[0, 0, 1, 1, 0.9]], np.float32), keypoints[None].astype(np.float32)

    mapped = InsightFaceDetector.__new__(InsightFaceDetector)
    mapped.model, mapped.input_size = Exact(), 640
    box = mapped._detect_boxes(frame, 0)[0][0]
    side = dlib_box[2] - dlib_box[0]
    assert np.abs(box - dlib_box).max() < 0.12 * side
    again = detector.predict(frame, box)
    iod = np.linalg.norm(landmarks[LEFT_EYE].mean(0) - landmarks[RIGHT_EYE].mean(0))
    assert np.abs(again - landmarks).mean() < 0.05 * iod


def test_detector_insightface_without_its_model_is_a_clear_error(tmp_path):
    from freetalk_core.errors import ModelFileError
    from freetalk_core.face_crop import make_detector

    with pytest.raises(ModelFileError, match="det_10g.onnx.*--detector dlib"):
        make_detector("insightface", tmp_path)
    with pytest.raises(ValueError, match="dlib, insightface"):
        make_detector("mtcnn", tmp_path)
