import cv2
import numpy as np
import pytest

from freetalk_core.flow import FLOW_METHODS, mouth_box, optical_flow


def _textured_image(h=128, w=128, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(h // 4, w // 4, 3)).astype(np.float32)
    smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth, 0, 255).astype(np.uint8)


def _shifted(img, dx, dy):
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_flow_recovers_known_translation(method):
    img = _textured_image()
    frames = np.stack([img, _shifted(img, 1.5, -0.75), _shifted(img, 1.5, 0.5)])
    flow = optical_flow(frames, method=method)
    assert flow.shape == (2, 128, 128, 2) and flow.dtype == np.float32
    centre = flow[:, 24:-24, 24:-24]
    np.testing.assert_allclose(np.median(centre[0].reshape(-1, 2), axis=0), [1.5, -0.75], atol=0.1)
    np.testing.assert_allclose(np.median(centre[1].reshape(-1, 2), axis=0), [0.0, 1.25], atol=0.1)


def test_flow_inside_box_only():
    img = _textured_image()
    frames = np.stack([img, _shifted(img, 1.0, 0.0)])
    box = (30, 40, 100, 90)
    flow = optical_flow(frames, box=box)
    outside = np.ones(flow.shape[1:3], bool)
    outside[40:90, 30:100] = False
    assert not flow[:, outside].any()
    assert np.median(flow[0, 50:80, 40:90, 0]) == pytest.approx(1.0, abs=0.1)


def test_flow_input_checks():
    with pytest.raises(ValueError, match="frames"):
        optical_flow(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 2"):
        optical_flow(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="method"):
        optical_flow(np.zeros((2, 8, 8, 3), np.uint8), method="lk")


def test_mouth_box_from_mask_with_margin_and_clipping():
    mask = np.zeros((100, 120), np.float32)
    mask[60:80, 40:90] = 0.3
    assert mouth_box(mask, margin=0) == (40, 60, 90, 80)
    assert mouth_box(mask, margin=10) == (30, 50, 100, 90)
    assert mouth_box(mask, margin=30) == (10, 30, 120, 100)
    seq = np.zeros((2, 100, 120), np.float32)
    seq[0, 10:20, 10:20] = 1
    seq[1, 50:60, 70:80] = 1
    assert mouth_box(seq, margin=0) == (10, 10, 80, 60)
    assert mouth_box(np.zeros((10, 10))) is None


def test_flow_of_real_sample_frames_follows_shift(samples_dir):
    av = pytest.importorskip("av")
    with av.open(str(samples_dir / "MimicTalk__May_5s.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    h, w = frame.shape[:2]
    crop = np.ascontiguousarray(frame[h // 2 - 96:h // 2 + 96, w // 2 - 96:w // 2 + 96])
    frames = np.stack([crop, _shifted(crop, 0.5, 0.25)])
    flow = optical_flow(frames)
    np.testing.assert_allclose(np.median(flow[0, 32:-32, 32:-32].reshape(-1, 2), axis=0),
                               [0.5, 0.25], atol=0.1)
