"""The chunk runner every stage uses: only pending chunks run, the next chunk's inputs are read
while the current one is computed, progress is reported, every unit of work gets its stage row,
and the stage logs one line.

A stage's units of work are its chunks `0..n-1` (`chunk_ranges(frames, job.chunk_frames)`),
optionally preceded by a whole-clip `SETUP` unit (chunk -1: e.g. tracking, the clip's shape
fit, the controller's anchor) and followed by a whole-clip `FINISH` unit (chunk -2: e.g.
encoding the output). The store's stage rows are the only record of what is done: a unit
counts as done when its latest row under the stage key says so and the stage's Zarr group
exists (`keep="final"` drops the groups of a done item: its stages then count as not done).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tasks.common import ItemJob, StageRef, chunk_ranges, progress, recorded_chunk, run_logger

SETUP = -1
"""Chunk number of a stage's whole-clip unit that runs before its chunks."""
FINISH = -2
"""Chunk number of a stage's whole-clip unit that runs after its chunks."""


class StageRun:
    """One stage of one item: which units are done, running the rest, the stage's log line.

    Reads the stage's done chunks from the store once. `frames` may be None until the
    `SETUP` unit knows it (face_crop); call `set_frames` then.
    """

    def __init__(self, job: ItemJob, stage: str, key: str, frames: int | None, *,
                 setup: bool = False, finish: bool = False,
                 chunks: list[tuple[int, int]] | None = None):
        self.job, self.stage, self.key = job, stage, key
        self.item = job.item_id
        self.store = job.open_store()
        self.has_setup, self.has_finish = setup, finish
        self._explicit_chunks = chunks is not None
        self.chunks: list[tuple[int, int]] = []
        self.frames = frames
        if chunks is not None:
            self.chunks = list(chunks)
        elif frames is not None:
            self.chunks = chunk_ranges(frames, job.chunk_frames) if frames else []
        done = self.store.done_chunks(self.item, stage, key)
        if done and not self.store.has_stage_group(self.item, stage):
            done = set()  # its arrays were dropped (keep="final"): its rows no longer hold
        self.done = done
        if not done:
            # Nothing of this stage is done under this key: arrays of any other key go.
            self.store.stage_group(self.item, stage, reset=True)
        self.computed = 0
        self.cached = 0
        self.warnings: list[str] = []
        self._started = time.perf_counter()
        self._units_done = 0

    # ---------------------------------------------------------------- state
    def set_frames(self, frames: int) -> None:
        self.frames = frames
        if not self._explicit_chunks:
            self.chunks = chunk_ranges(frames, self.job.chunk_frames) if frames else []

    @property
    def units(self) -> list[int]:
        return (([SETUP] if self.has_setup else []) + list(range(len(self.chunks)))
                + ([FINISH] if self.has_finish else []))

    @property
    def complete(self) -> bool:
        """Every unit done (False while `frames` is unknown and chunks are expected)."""
        if self.frames is None and not self._explicit_chunks:
            return False
        return all(unit in self.done for unit in self.units)

    def warn(self, message: str) -> None:
        """A warning for the stage's log line (e.g. frames without a face)."""
        self.warnings.append(message)

    # ------------------------------------------------------------------ work
    def _progress(self) -> None:
        progress.update(self.item, self.stage, self._units_done, max(len(self.units), 1))

    def _unit(self, unit: int, frames: int, body: Callable[[], Any]) -> Any:
        if unit in self.done:
            self.cached += 1
            self._units_done += 1
            return None
        self._progress()
        with recorded_chunk(self.store, self.item, self.stage, unit, self.key, frames=frames):
            result = body()
        self.done.add(unit)
        self.computed += 1
        self._units_done += 1
        return result

    def setup(self, body: Callable[[], Any]) -> Any:
        """Run the whole-clip `SETUP` unit unless it is done; returns what `body` returns (None
        when it was done before)."""
        return self._unit(SETUP, self.frames or 0, body)

    def finish(self, body: Callable[[], Any]) -> Any:
        """Run the whole-clip `FINISH` unit unless it is done."""
        return self._unit(FINISH, self.frames or 0, body)

    def pending_chunks(self) -> list[tuple[int, int, int]]:
        return [(c, start, stop) for c, (start, stop) in enumerate(self.chunks) if c not in self.done]

    def pending_ranges(self) -> list[tuple[int, int]]:
        """`(start, stop)` of the pending chunks, in order (what a stage's reader will be asked for)."""
        return [(start, stop) for _, start, stop in self.pending_chunks()]

    def run_chunks(self, compute: Callable[..., None],
                   read: Callable[[int, int], Any] | None = None) -> None:
        """`compute(start, stop, inputs)` for each pending chunk, in order; `inputs` is
        `read(start, stop)`, called on a reader thread one chunk ahead (so the next chunk's
        inputs are read and decoded while this one is computed), or None without `read`."""
        todo = self.pending_chunks()
        skipped = len(self.chunks) - len(todo)
        self.cached += skipped
        self._units_done += skipped
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.stage}-read") as reader:
            upcoming = reader.submit(read, *todo[0][1:]) if read else None
            for i, (chunk, start, stop) in enumerate(todo):
                inputs = upcoming.result() if read else None
                if read and i + 1 < len(todo):
                    upcoming = reader.submit(read, *todo[i + 1][1:])
                self._progress()
                with recorded_chunk(self.store, self.item, self.stage, chunk, self.key,
                                    frames=stop - start):
                    compute(start, stop, inputs)
                self.done.add(chunk)
                self.computed += 1
                self._units_done += 1

    def result(self) -> StageRef:
        """`close` the stage and return its reference (what the stage task returns)."""
        self.close()
        return StageRef(item_id=self.item, stage=self.stage, key=self.key, frames=self.frames or 0)

    def close(self) -> None:
        """Progress to the end and the stage's log line: frames, seconds, units computed vs
        cached, warnings."""
        self._progress()
        seconds = time.perf_counter() - self._started
        line = (f"{self.stage} {self.item}: {self.frames or 0} frames, {seconds:.1f} s, "
                f"{self.computed} chunks computed, {self.cached} cached")
        if self.warnings:
            line += "; " + "; ".join(self.warnings)
        run_logger().info(line)
