"""Stage 7: dense optical flow of the mouth region, generated crops and reference motion."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import flow
from storage import Store
from tasks.common import STAGE_CACHE, ItemJob, StageRef, chunk_ranges, is_transient, progress, recorded_chunk

STAGE = "optical_flow"
BOX_MARGIN = 16


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


@task(name="optical_flow", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def optical_flow(job: ItemJob, key: str, crops: StageRef, structure: StageRef,
                 generated: StageRef) -> StageRef:
    """`generated_flow`, `reference_flow` `(T-1, h, w, 2) float32` inside the mouth box."""
    store = job.open_store()
    item, n = job.item_id, generated.frames
    pairs = max(0, n - 1)
    chunks = chunk_ranges(pairs, job.chunk_frames) if pairs else []
    done = store.done_chunks(item, STAGE, key)
    if -1 in done and all(c in done for c in range(len(chunks))):
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)

    box = mouth_box(store.array(item, "face_crop", "mouth_masks"))
    x0, y0, x1, y1 = box
    shape = (pairs, y1 - y0, x1 - x0, 2)
    sources = {"generated_flow": store.array(item, "diffusion", "frames"),
               "reference_flow": reference_frames(store, job)}
    outputs = {name: store.open_array(item, STAGE, name, shape, np.float32, job.chunk_frames)
               for name in sources}
    for chunk, (start, stop) in enumerate(chunks):
        progress.update(item, STAGE, chunk, len(chunks))
        if chunk in done:
            continue
        with recorded_chunk(store, item, STAGE, chunk, key, frames=stop - start):
            for name, frames in sources.items():
                # Flow pairs start..stop need frames start..stop inclusive.
                outputs[name][start:stop] = flow.optical_flow(frames[start:stop + 1, y0:y1, x0:x1])
    with recorded_chunk(store, item, STAGE, -1, key, frames=n):
        store.set_attrs(item, STAGE, box=list(box), reference=job.flow_reference)
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
