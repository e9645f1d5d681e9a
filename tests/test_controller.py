import numpy as np
import pytest

from freetalk_core import controller, lips
from freetalk_core.face_crop import CROP_TEMPLATE


def _landmarks_with_openings(openings):
    """Landmarks whose three outer-lip pairs are `openings[t]` pixels apart vertically."""
    lm = np.zeros((len(openings), 68, 2), dtype=np.float32)
    for t, h in enumerate(openings):
        for upper, lower in lips.OUTER_LIP_PAIRS:
            lm[t, upper] = (upper, 300.0)
            lm[t, lower] = (upper, 300.0 + h)
    return lm


def test_raw_lip_distance_is_mean_of_three_vertical_gaps():
    lm = _landmarks_with_openings([4.0])
    lm[0, 58, 1] = 300.0 + 10.0  # left pair opens further: (10 + 4 + 4) / 3
    assert lips.raw_lip_distance(lm)[0] == pytest.approx(6.0)


def test_lip_distance_is_centred_moving_average_of_five():
    h = np.array([1, 2, 3, 4, 10, 6, 7], dtype=float)
    got = lips.lip_distance(_landmarks_with_openings(h))
    # hand-computed: ends average the frames that exist
    expected = [(1 + 2 + 3) / 3, (1 + 2 + 3 + 4) / 4, (1 + 2 + 3 + 4 + 10) / 5,
                (2 + 3 + 4 + 10 + 6) / 5, (3 + 4 + 10 + 6 + 7) / 5, (4 + 10 + 6 + 7) / 4,
                (10 + 6 + 7) / 3]
    np.testing.assert_allclose(got, expected)


def test_anchor_is_the_most_closed_frame_of_the_smoothed_opening():
    # Frame 2 is the most closed raw; smoothed over five frames, the last one is (1 + 1 + 1) / 3.
    h = np.array([3.0, 3.0, 0.5, 4.0, 1.0, 1.0, 1.0])
    assert lips.closed_mouth_index(_landmarks_with_openings(h)) == int(np.argmin(lips.lip_distance(
        _landmarks_with_openings(h)))) == 6


def _closed_mouth_variants():
    """(10, 68, 2) landmarks: frames 0-5 one closed mouth (lips touching) with a little detector
    noise, 6 the lips pressed together, 7 pouted, 8-9 open."""
    base = CROP_TEMPLATE.astype(np.float32).copy()
    base[[67, 66, 65], 1] = base[[61, 62, 63], 1]
    iod = np.linalg.norm(base[42:48].mean(0) - base[36:42].mean(0))
    frames = np.repeat(base[None], 10, axis=0) + np.random.default_rng(0).normal(0, 0.3, (10, 68, 2))
    frames[6, 49:54, 1] += 0.06 * iod  # pressed: the outer lip edges move towards each other
    frames[6, 55:60, 1] -= 0.06 * iod
    frames[7, [48, 60], 0] += 0.1 * iod  # pouted: the corners come in, the lips push out
    frames[7, [54, 64], 0] -= 0.1 * iod
    frames[7, 49:54, 1] -= 0.03 * iod
    frames[7, 55:60, 1] += 0.03 * iod
    frames[8:, [5, 6, 7, 8, 9, 10, 11, 55, 56, 57, 58, 59, 65, 66, 67], 1] += 0.15 * iod
    return frames.astype(np.float32)


def test_the_usual_closed_mouth_is_neither_pressed_nor_pouted_nor_open():
    frames = _closed_mouth_variants()
    assert int(np.argmin(lips.lip_opening(frames))) == 6  # pressed lips: the most closed by the outer lips
    usual = lips.typical_closed_frames(frames, 10)
    assert sorted(usual[:6].tolist()) == [0, 1, 2, 3, 4, 5]
    assert sorted(usual[6:].tolist()) == [6, 7]  # the open frames are not closed mouths at all
    assert lips.typical_closed_frames(frames, 3).tolist() == usual[:3].tolist()
    assert lips.typical_closed_frames(frames[8:], 1).shape == (1,)  # always at least one frame


def test_lambdas_ratio_with_first_one_and_clipping():
    h = np.array([2.0, 4.0, 3.0, 30.0, 1.0, 0.0, 2.0])
    lam = controller.lambdas(h, (0.5, 2.0))
    np.testing.assert_allclose(lam, [1.0, 2.0, 0.75, 2.0, 0.5, 0.5, 2.0])


def test_adjust_embeddings_matches_formula_and_keeps_class_token():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(4, 257, 8)).astype(np.float32)
    lam = np.array([1.0, 1.5, 0.5, 2.0])
    out = controller.adjust_embeddings(e, anchor=2, lambdas=lam)
    np.testing.assert_array_equal(out[:, 0], e[:, 0])
    for t in range(4):
        expected = e[2, 1:] + lam[t] * (e[t, 1:] - e[2, 1:])
        np.testing.assert_allclose(out[t, 1:], expected, rtol=1e-6, atol=1e-6)
    # the anchor frame itself is a fixed point whatever its lambda
    np.testing.assert_allclose(out[2], e[2], atol=1e-6)


def test_adjust_embeddings_rejects_mismatched_lambdas():
    with pytest.raises(ValueError, match="lambdas"):
        controller.adjust_embeddings(np.zeros((3, 257, 4)), 0, np.ones(2))
