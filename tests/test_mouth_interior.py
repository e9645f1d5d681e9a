"""What the structure frames show between parted lips (`paint_mouth_interior`)."""

import cv2
import numpy as np

from freetalk_core.structure_render.mouth_interior import (
    THROAT_RGB,
    cavity_coverage,
    paint_mouth_interior,
    teeth_colour,
)

IOD = 120.0  # inter-ocular distance, px
TEETH = np.array([220.0, 210.0, 195.0], np.float32)


def _mouth(height):
    """A lens-shaped open mouth `height` px tall on a lip-coloured image, and its mask."""
    colour = np.full((200, 200, 3), (170, 80, 80), np.float32)
    inside = np.zeros((200, 200), np.float32)
    cv2.ellipse(inside, (100, 100), (45, height // 2), 0, 0, 360, 1.0, -1)
    return colour, inside


def _luminance(image):
    return image @ np.array([0.299, 0.587, 0.114], np.float32)


def test_an_open_mouth_shows_teeth_under_the_upper_lip_and_a_dark_throat_below():
    colour, inside = _mouth(40)
    painted = paint_mouth_interior(colour, inside, IOD, TEETH)
    column = _luminance(painted[:, 100])
    rows = np.flatnonzero(inside[:, 100] > 0.5)
    top, bottom = rows.min(), rows.max()
    assert column[top + 1] > 150  # teeth just under the upper lip
    assert column[(top + bottom) // 2 + 4] < 25  # the throat
    # Teeth fade towards the corners; the lip outside the mouth is kept.
    assert _luminance(painted[top + 1, 100]) > _luminance(painted[np.flatnonzero(inside[:, 58])[0] + 1, 58])
    far = np.ones((200, 200), bool)
    far[40:160, 40:160] = False
    np.testing.assert_array_equal(painted[far], colour[far])
    edge = cv2.dilate((inside > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)) - (inside > 0.5)
    assert _luminance(painted[edge > 0]).mean() < _luminance(colour[edge > 0]).mean()  # no light rim


def test_a_slit_shows_no_teeth_and_a_closed_mouth_nothing():
    colour, inside = _mouth(6)
    painted = paint_mouth_interior(colour, inside, IOD, TEETH)
    # No teeth: the teeth's colour changes nothing; the opening is dark.
    np.testing.assert_array_equal(painted, paint_mouth_interior(colour, inside, IOD, np.zeros(3, np.float32)))
    assert _luminance(painted[100, 100]) < _luminance(np.array(THROAT_RGB, np.float32)) + 10
    np.testing.assert_array_equal(paint_mouth_interior(colour, np.zeros((200, 200)), IOD, TEETH), colour)


def test_teeth_are_lit_like_the_face():
    assert (teeth_colour([200, 170, 150]) > teeth_colour([90, 70, 60])).all()


def _lens_edges(height, centre_y=100.3, half_width=45.0):
    """Upper and lower inner lip edges of a lens `height` px tall at its middle (shuffled)."""
    x = np.linspace(100 - half_width, 100 + half_width, 31)
    bulge = height / 2 * (1 - ((x - 100) / half_width) ** 2)
    order = np.random.default_rng(0).permutation(len(x))
    return (np.stack([x, centre_y - bulge], 1)[order], np.stack([x, centre_y + bulge], 1)[order])


def test_the_cavity_covers_each_pixel_column_by_the_opening_there():
    upper, lower = _lens_edges(6.0)
    coverage = cavity_coverage(upper, lower, 200)
    centres = np.arange(200) + 0.5
    top, bottom = (np.interp(centres, *edge[np.argsort(edge[:, 0])].T) for edge in (upper, lower))
    expected = (bottom - top) * (np.abs(centres - 100) <= 45)
    np.testing.assert_allclose(coverage.sum(axis=0), expected, atol=1e-5)
    assert coverage.min() >= 0 and coverage.max() <= 1
    # Touching or crossed edges: nothing open.
    assert not cavity_coverage(lower, upper, 200).any()
    assert not cavity_coverage(upper, upper, 200).any()


def test_a_parting_thinner_than_a_pixel_darkens_the_whole_lip_line():
    colour = np.full((200, 200, 3), (170, 80, 80), np.float32)
    upper, lower = _lens_edges(0.6)
    painted = paint_mouth_interior(colour, cavity_coverage(upper, lower, 200), IOD, TEETH)
    row = _luminance(painted[100, 70:131])  # the lip line's row, away from the corners
    assert (row < _luminance(colour[100, 70:131]) - 20).all()
