"""Stage 7: dense optical flow of the mouth region, generated crops and reference motion."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import flow
from storage import Store
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, chunk_ranges

STAGE = "optical_flow"
BOX_MARGIN = 16
FLOW_DTYPE = np.float16
"""Stored flow fields: float16 keeps 1/1000 of the displacement (0.01 px at 10 px) and
halves the bytes; the Noise Sensor reads them back as float32."""


def mouth_box(masks, margin: int = BOX_MARGIN) -> tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` around every frame's mouth mask, plus `margin` pixels."""
    union = np.zeros(masks.shape[1:], dtype=bool)
    for start in range(0, masks.shape[0], 64):
        union |= (masks[start:start + 64] > 0).any(axis=0)
    if not union.any():
        return 0, 0, int(masks.shape[2]), int(masks.shape[1])
    ys, xs = np.nonzero(union)
    h, w = union.shape
    return (max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin),
            min(w, int(xs.max()) + 1 + margin), min(h, int(ys.max()) + 1 + margin))


def reference_frames(store: Store, job: ItemJob):
    """The frames whose motion the output should have (METHOD.md step 7)."""
    if job.flow_reference == "structure":
        return store.array(job.item_id, "structure_render", "frames")
    if job.flow_reference == "identity":
        return store.array(job.item_id, "face_crop", "identity_crops")
    raise ValueError(f"flow_reference must be 'structure' or 'identity', got {job.flow_reference!r}")


@task(name="optical_flow", **STAGE_TASK)
def optical_flow(job: ItemJob, key: str, crops: StageRef, structure: StageRef,
                 generated: StageRef) -> StageRef:
    """The mouth `box` (the `SETUP` unit), then `generated_flow`, `reference_flow`
    `(T-1, h, w, 2) float16` inside it, a chunk of flow fields at a time."""
    item, n = job.item_id, generated.frames
    pairs = max(0, n - 1)
    run = StageRun(job, STAGE, key, n, setup=True, chunks=chunk_ranges(pairs, job.chunk_frames) if pairs else [])
    if run.complete:
        run.close()
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
    store = run.store
    run.setup(lambda: store.set_attrs(item, STAGE, reference=job.flow_reference,
                                      box=list(mouth_box(store.array(item, "face_crop", "mouth_masks")))))
    x0, y0, x1, y1 = store.attrs(item, STAGE)["box"]
    shape = (pairs, y1 - y0, x1 - x0, 2)
    sources = {"generated_flow": store.array(item, "diffusion", "frames"),
               "reference_flow": reference_frames(store, job)}
    outputs = {name: store.open_array(item, STAGE, name, shape, FLOW_DTYPE, job.chunk_frames)
               for name in sources}

    def read(start, stop):
        # Flow pairs start..stop need frames start..stop inclusive.
        return {name: frames[start:stop + 1, y0:y1, x0:x1] for name, frames in sources.items()}

    def compute(start, stop, frames):
        for name, block in frames.items():
            outputs[name][start:stop] = flow.optical_flow(block).astype(FLOW_DTYPE)

    run.run_chunks(compute, read)
    run.close()
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
