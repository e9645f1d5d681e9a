"""What the structure frames show between parted lips (`paint_mouth_interior`)."""

import cv2
import numpy as np

from freetalk_core.structure_render.mouth_interior import THROAT_RGB, paint_mouth_interior, teeth_colour

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
    # Teeth fade towards the corners; the lip outside the mouth is kept (but a thin edge shadow).
    assert _luminance(painted[top + 1, 100]) > _luminance(painted[np.flatnonzero(inside[:, 58])[0] + 1, 58])
    far = np.ones((200, 200), bool)
    far[40:160, 40:160] = False
    np.testing.assert_array_equal(painted[far], colour[far])
    edge = cv2.dilate((inside > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)) - (inside > 0.5)
    assert _luminance(painted[edge > 0]).mean() < _luminance(colour[edge > 0]).mean()  # no light rim


def test_a_slit_shows_no_teeth_and_a_closed_mouth_nothing():
    colour, inside = _mouth(6)
    painted = paint_mouth_interior(colour, inside, IOD, TEETH)
    assert _luminance(painted[inside > 0.5]).max() < _luminance(np.array(THROAT_RGB, np.float32)) + 40
    np.testing.assert_array_equal(paint_mouth_interior(colour, np.zeros((200, 200)), IOD, TEETH), colour)


def test_teeth_are_lit_like_the_face():
    assert (teeth_colour([200, 170, 150]) > teeth_colour([90, 70, 60])).all()
