import numpy as np
import pytest

from freetalk_core import controller, lips


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
