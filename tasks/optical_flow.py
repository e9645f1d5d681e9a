"""Stage 7: dense optical flow of the mouth region, generated crops and reference motion."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import flow
from storage import Store
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, chunk_ranges, flow_values
from tasks.frames import Crops, StoredStructureFrames

STAGE = "optical_flow"
def reference_frames(store: Store, job: ItemJob) -> Crops | StoredStructureFrames:
    """The frames whose motion the output should have (METHOD.md step 7)."""
    if job.flow_reference == "structure":
        return StoredStructureFrames(store, job.item_id, job.identity)
    if job.flow_reference == "identity":
        return Crops(store, job.item_id, "identity", job.identity)
    raise ValueError(f"flow_reference must be 'structure' or 'identity', got {job.flow_reference!r}")


@task(name="optical_flow", **STAGE_TASK)
def optical_flow(job: ItemJob, key: str, crops: StageRef, structure: StageRef,
                 generated: StageRef) -> StageRef:
    """The mouth `box` (the `SETUP` unit), then `generated_flow`, `reference_flow`
    `(T-1, h, w, 2) int16` (multiples of `FLOW_STEP` px) inside it, a chunk of flow fields at a time."""
    item, n = job.item_id, generated.frames
    pairs = max(0, n - 1)
    run = StageRun(job, STAGE, key, n, setup=True, chunks=chunk_ranges(pairs, job.chunk_frames) if pairs else [])
    if run.complete:
        run.close()
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
    store = run.store
    run.setup(lambda: store.set_attrs(item, STAGE, reference=job.flow_reference,
                                      box=store.attrs(item, "face_crop")["box"]))
    x0, y0, x1, y1 = store.attrs(item, STAGE)["box"]
    shape = (pairs, y1 - y0, x1 - x0, 2)
    diffused = store.array(item, "diffusion", "frames")
    # Flow pairs start..stop need frames start..stop inclusive.
    reference = reference_frames(store, job).reader([(start, stop + 1) for start, stop in run.pending_ranges()])
    outputs = {name: store.open_array(item, STAGE, name, shape, np.int16, job.chunk_frames)
               for name in ("generated_flow", "reference_flow")}

    def read(start, stop):
        return {"generated_flow": diffused[start:stop + 1, y0:y1, x0:x1],
                "reference_flow": reference(start, stop + 1)[:, y0:y1, x0:x1]}

    def compute(start, stop, frames):
        for name, block in frames.items():
            outputs[name][start:stop] = flow_values(flow.optical_flow(block))

    run.run_chunks(compute, read)
    run.close()
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
