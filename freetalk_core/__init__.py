"""freetalk's algorithms: pure functions and small classes, arrays in and arrays out.

Nothing here imports Prefect or knows where the store keeps things.
"""

CROP_SIZE = 512
"""Side of the canonical face crop every stage works on, in pixels."""

DEFAULT_FPS = 25.0
"""Working frame rate: inputs at other rates are resampled to it."""
