"""Frames of an item made again from its inputs and what the store keeps: the decoded source
frames, the aligned crops and the structure frames, a chunk at a time (one decoder through a
stage's pending chunks), never a whole clip in memory."""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np

from freetalk_core import CROP_SIZE, video
from freetalk_core.face_crop import warp_to_crop
from storage import Store, arrays

CROP_ROLES = (*arrays.ROLES, "output")


def mouth_box_frames(frames: np.ndarray, box) -> np.ndarray:
    """`frames (T, H, W, 3)` with everything outside the mouth `box` set to 0. Nothing reads
    generated or filtered crops outside the box (the mouth mask lies inside it), and arrays
    declared `TILED` in `storage.arrays` do not store the all-zero pieces."""
    x0, y0, x1, y1 = box
    out = np.zeros_like(frames)
    out[:, y0:y1, x0:x1] = frames[:, y0:y1, x0:x1]
    return out


class SourceFrames:
    """Decoded source frames of one video for successive chunks of output frames.

    `index` `(T,)` maps output frames to source frames; `chunks` are the `(start, stop)` output
    ranges that will be asked for, in order. One decoder runs through them, seeking only where
    a chunk's frames lie behind the last one (a ping-pong loop) or far ahead.
    """

    def __init__(self, path: str, fps: float, index: np.ndarray, chunks: list[tuple[int, int]]):
        self.index = np.asarray(index)
        self.wanted = [np.unique(self.index[start:stop]) for start, stop in chunks]
        # Source frames the previous chunk also needs (overlapping ranges) are kept, not decoded again.
        self.new = [np.setdiff1d(w, self.wanted[i - 1]) if i else w for i, w in enumerate(self.wanted)]
        order = np.concatenate(self.new) if self.new else np.zeros(0, np.int64)
        self._frames: Iterator[np.ndarray] = video.read_frames(path, fps=fps, indices=order)
        self._next = 0
        self._last: dict[int, np.ndarray] = {}

    def __call__(self, start: int, stop: int) -> dict[int, np.ndarray]:
        """`{source index: (H, W, 3) uint8}` for output frames `[start, stop)`; chunks must be
        asked for in the order given."""
        wanted, new = self.wanted[self._next], self.new[self._next]
        if not np.array_equal(wanted, np.unique(self.index[start:stop])):
            raise ValueError(f"chunk [{start}, {stop}) asked for out of order")
        self._next += 1
        frames = {i: self._last[i] for i in wanted.tolist() if i in self._last}
        frames.update(zip(new.tolist(), islice(self._frames, len(new))))
        following = set(self.wanted[self._next].tolist()) if self._next < len(self.wanted) else set()
        self._last = {i: f for i, f in frames.items() if i in following}
        return frames


class Crops:
    """The aligned `(T, 512, 512, 3) uint8` crops of one video of an item (`role` identity,
    lip_ref, or output: the item's output video, cropped where its identity frames were), made
    on demand from the video and the transforms `face_crop` stored (a crop is one decode and one
    affine warp away: cheaper to redo than to keep, 0.55 MB per frame).

    `path`: the video (the job's; else the one the store's items table records).
    `crops[t]`, `crops[a:b]` and `take(frames)` decode what they need; `reader(ranges)` gives a
    chunk reader for `run_chunks` with one decoder through ranges asked for in order."""

    def __init__(self, store: Store, item_id: str, role: str, path: str | None = None):
        if role not in CROP_ROLES:
            raise ValueError(f"role must be one of {', '.join(CROP_ROLES)}, got {role!r}")
        if path is None:  # the video the store recorded for the item
            path = (store.item(item_id) or {}).get(role)
            if not path:
                raise FileNotFoundError(f"the store records no {role} video for item {item_id!r}")
        self.path, self.fps = str(path), float(store.attrs(item_id, arrays.FACE_CROP)["fps"])
        # The output's frames are the output frames themselves, cropped like the identity's.
        source = "identity" if role == "output" else role
        self.transforms = store.read(item_id, arrays.CROP_TRANSFORMS[source])
        self.index = (np.arange(len(self.transforms)) if role == "output"
                      else store.read(item_id, arrays.SOURCE_INDEX[role]))
        self.shape = (len(self.index), CROP_SIZE, CROP_SIZE, 3)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def _warp(self, sources: dict[int, np.ndarray], frames) -> np.ndarray:
        return np.stack([warp_to_crop(sources[self.index[t]], self.transforms[t], CROP_SIZE)
                         for t in frames]) if len(frames) else np.zeros((0,) + self.shape[1:], np.uint8)

    def take(self, frames) -> np.ndarray:
        """The crops of output frames `frames` (any order), `(len(frames), 512, 512, 3)`."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        if len(frames) == 0:
            return self._warp({}, frames)
        sources = SourceFrames(self.path, self.fps, self.index[frames], [(0, len(frames))])(0, len(frames))
        return self._warp(sources, frames)

    def __getitem__(self, key):
        """`crops[t]`, `crops[a:b]` or `crops[frame numbers]`."""
        if isinstance(key, slice):
            return self.take(range(*key.indices(len(self))))
        if np.ndim(key):
            return self.take(key)
        return self.take([int(key)])[0]

    def reader(self, ranges: list[tuple[int, int]]):
        """`read(start, stop) -> (stop - start, 512, 512, 3)` for `ranges` asked for in order
        (they may overlap: the frames they share are decoded once)."""
        sources = SourceFrames(self.path, self.fps, self.index, ranges)
        return lambda start, stop: self._warp(sources(start, stop), range(start, stop))


class StoredStructureFrames:
    """The stored structure frames of an item, `(T, 512, 512, 3) uint8`, read a range at a time
    (`reader(ranges)`, like `Crops.reader`) or by slice."""

    def __init__(self, store: Store, item_id: str, identity: str | None = None):
        self.crops = Crops(store, item_id, "identity", identity)
        self.layer = store.array(item_id, arrays.STRUCTURE_LAYER)
        self.changed = store.array(item_id, arrays.STRUCTURE_CHANGED)
        self.shape, self.dtype = self.crops.shape, self.crops.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _compose(self, crops: np.ndarray, start: int, stop: int) -> np.ndarray:
        return np.where(self.changed[start:stop][..., None], self.layer[start:stop], crops)

    def __getitem__(self, key: slice | int) -> np.ndarray:
        """`frames[a:b]` or `frames[t]`."""
        if not isinstance(key, slice):
            return self[int(key):int(key) + 1][0]
        start, stop, _ = key.indices(len(self))
        return self._compose(self.crops[start:stop], start, stop)

    def reader(self, ranges: list[tuple[int, int]]):
        crops = self.crops.reader(ranges)
        return lambda start, stop: self._compose(crops(start, stop), start, stop)
