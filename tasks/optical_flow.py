"""Stage 7: dense optical flow of the mouth region, generated crops and reference motion."""

from __future__ import annotations

from prefect import task

from freetalk_core import flow
from storage import Store, arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, chunk_ranges, flow_values
from tasks.frames import Crops, StoredStructureFrames

STAGE = arrays.OPTICAL_FLOW


def reference_frames(store: Store, job: ItemJob) -> Crops | StoredStructureFrames:
    """The frames whose motion the output should have (METHOD.md step 7)."""
    if job.flow_reference == "structure":
        return StoredStructureFrames(store, job.item_id, job.identity)
    if job.flow_reference == "identity":
        return Crops(store, job.item_id, "identity", job.identity)
    raise ValueError(f"flow_reference must be 'structure' or 'identity', got {job.flow_reference!r}")


@task(name=STAGE, **STAGE_TASK)
def optical_flow(job: ItemJob, key: str, crops: StageRef, structure: StageRef,
                 generated: StageRef) -> StageRef:
    """The mouth `box` (the `SETUP` unit), then `generated_flow`, `reference_flow`
    `(T-1, h, w, 2) int16` (multiples of `FLOW_STEP` px) inside it, a chunk of flow fields at a time."""
    item, n = job.item_id, generated.frames
    pairs = max(0, n - 1)
    run = StageRun(job, STAGE, key, n, setup=True, chunks=chunk_ranges(pairs, job.chunk_frames) if pairs else [])
    if run.complete:
        return run.result()
    store = run.store
    run.setup(lambda: store.set_attrs(item, STAGE, reference=job.flow_reference,
                                      box=store.attrs(item, arrays.FACE_CROP)["box"]))
    x0, y0, x1, y1 = store.attrs(item, STAGE)["box"]
    shape = (pairs, y1 - y0, x1 - x0, 2)
    diffused = store.array(item, arrays.GENERATED_FRAMES)
    # Flow pairs start..stop need frames start..stop inclusive.
    reference = reference_frames(store, job).reader([(start, stop + 1) for start, stop in run.pending_ranges()])
    generated_flow = store.open_array(item, arrays.GENERATED_FLOW, shape, job.chunk_frames)
    reference_flow = store.open_array(item, arrays.REFERENCE_FLOW, shape, job.chunk_frames)

    def read(start, stop):
        return diffused[start:stop + 1, y0:y1, x0:x1], reference(start, stop + 1)[:, y0:y1, x0:x1]

    def compute(start, stop, frames):
        generated_block, reference_block = frames
        generated_flow[start:stop] = flow_values(flow.optical_flow(generated_block))
        reference_flow[start:stop] = flow_values(flow.optical_flow(reference_block))

    run.run_chunks(compute, read)
    return run.result()
