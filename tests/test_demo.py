import av
import numpy as np
import pytest

from freetalk_core import demo, video
from freetalk_core.face_crop import LandmarkDetector

LIP_PAIRS = [(50, 58), (51, 57), (52, 56)]  # outer lip, 0-based iBUG


def lip_opening(landmarks):
    return float(np.mean([np.linalg.norm(landmarks[a] - landmarks[b]) for a, b in LIP_PAIRS]))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return demo.make_demo_clips(tmp_path_factory.mktemp("demo"), seconds=2.0, fps=25)


@pytest.fixture(scope="module")
def tracks(clips):
    detector = LandmarkDetector()
    found = {}
    for name, path in zip(("identity", "lip_ref"), clips):
        found[name] = [detector.detect(frame) for frame in video.read_frames(path)]
    return found


def test_clips_have_the_requested_length_and_audio(clips):
    identity, lip_ref = clips
    assert identity.name == "identity.mp4" and lip_ref.name == "lip_ref.mp4"
    for path in clips:
        info = video.probe(path)
        assert info.n_frames == 50 and info.fps == pytest.approx(25.0)
        assert info.duration == pytest.approx(2.0, abs=1e-6)
    assert not video.has_audio(identity)
    assert video.has_audio(lip_ref)
    assert abs(video.audio_duration(lip_ref) - 2.0) < 0.05
    assert sorted(p.name for p in lip_ref.parent.iterdir()) == ["identity.mp4", "lip_ref.mp4"]


def test_face_found_in_every_frame(tracks):
    for name, landmarks in tracks.items():
        missing = [t for t, lm in enumerate(landmarks) if lm is None]
        assert missing == [], f"{name}: no face in frames {missing}"


def test_identity_head_moves_but_mouth_stays(tracks):
    landmarks = np.stack(tracks["identity"])
    eye_line = landmarks[:, 45] - landmarks[:, 36]
    roll = np.degrees(np.arctan2(eye_line[:, 1], eye_line[:, 0]))
    assert roll.max() - roll.min() > 3.0  # about +-3 degrees of sway
    assert np.ptp(landmarks[:, 30, 0]) > 4.0  # the nose tip travels sideways
    # smooth: no jumps between consecutive frames
    assert np.abs(np.diff(landmarks[:, 30], axis=0)).max() < 4.0
    openings = [lip_opening(lm) for lm in landmarks]
    assert np.ptp(openings) < 3.0


def test_lip_reference_mouth_opens_and_closes(tracks):
    openings = np.array([lip_opening(lm) for lm in tracks["lip_ref"]])
    assert openings.max() - openings.min() > 6.0  # px, on a mouth about 45 px wide
    driven = demo.mouth_opening(np.arange(len(openings)) / 25)
    assert np.corrcoef(openings, driven)[0, 1] > 0.85
    assert openings[0] < openings.min() + 1.5  # starts closed: a clean anchor frame
    # the head itself stays still
    eyes = np.stack(tracks["lip_ref"])[:, 36:48]
    assert np.abs(eyes - eyes[0]).max() < 2.0


def test_lip_reference_audio_follows_the_mouth(clips):
    with av.open(str(clips[1])) as container:
        samples = np.concatenate([f.to_ndarray().mean(0) for f in container.decode(audio=0)])
    rate = video.AUDIO_RATE
    per_frame = rate // 25
    rms = np.array([np.sqrt(np.mean(samples[k * per_frame:(k + 1) * per_frame] ** 2))
                    for k in range(50)])
    driven = demo.mouth_opening((np.arange(50) + 0.5) / 25)
    assert rms.max() > 0.02
    assert np.corrcoef(rms, driven)[0, 1] > 0.8


def test_open_mouth_is_identity_when_closed():
    image = demo.demo_photo()
    landmarks = demo.photo_landmarks(image)
    closed = demo.open_mouth(image, landmarks, 0.0)
    assert np.abs(closed.astype(int) - image).max() <= 1
    wide = demo.open_mouth(image, landmarks, 1.0)
    x0, y0 = landmarks[48:60].min(0).astype(int)
    x1, y1 = landmarks[48:60].max(0).astype(int)
    region = (slice(y0, y1 + 15), slice(x0, x1 + 1))
    # the opened mouth shows the dark interior; the upper face is untouched
    assert wide[region].mean() < image[region].mean() - 15
    eyes_y = int(landmarks[36:48, 1].max()) + 5
    np.testing.assert_array_equal(wide[:eyes_y], image[:eyes_y])
