"""freetalk's algorithms: pure functions and small classes, arrays in and arrays out.

Nothing here imports Prefect or knows where the store keeps things.
"""

CROP_SIZE = 512
"""Side of the canonical face crop every stage works on, in pixels."""

DEFAULT_FPS = 25.0
"""Frame rate of decoding when none is asked for, and of a stream that states none. An item is
made at its identity video's own rate (or the one asked for), not at this one."""
