"""Stage 5: Anchor / Structure Controller."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import lips
from freetalk_core.controller import adjust_embeddings, lambdas
from storage import arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef

STAGE = arrays.CONTROLLER


@task(name=STAGE, **STAGE_TASK)
def controller(job: ItemJob, key: str, crops: StageRef, embeddings: StageRef) -> StageRef:
    """`lip_distance (T,)`, `lambdas (T,)`, `anchor_index` (the `SETUP` unit), then
    `embeddings (T, 257, D) float16` a chunk at a time."""
    item, n = job.item_id, embeddings.frames
    run = StageRun(job, STAGE, key, n, setup=True)
    if run.complete:
        return run.result()
    store = run.store

    def setup():
        landmarks = store.read(item, arrays.LANDMARKS["lip_ref"])
        h, anchor = lips.lip_distance(landmarks), lips.closed_mouth_index(landmarks)
        store.write_array(item, arrays.LIP_DISTANCE, h.astype(np.float32))
        store.write_array(item, arrays.LAMBDAS, lambdas(h, tuple(job.lambda_range)).astype(np.float32))
        store.write_array(item, arrays.ANCHOR_INDEX, np.array(anchor, dtype=np.int64))
        store.set_attrs(item, STAGE, anchor_index=anchor)

    run.setup(setup)
    anchor = int(store.read(item, arrays.ANCHOR_INDEX))
    lam = store.read(item, arrays.LAMBDAS)
    e = store.array(item, arrays.STRUCTURE_EMBEDDINGS)
    e_anchor = e[anchor:anchor + 1]
    out = store.open_array(item, arrays.ADJUSTED_EMBEDDINGS, e.shape, job.chunk_frames)

    def compute(start, stop, block):
        # The anchor rides along as row 0 with lambda 1, so every chunk adjusts towards it.
        stacked = np.concatenate([e_anchor, block]).astype(np.float32)
        out[start:stop] = adjust_embeddings(stacked, 0, np.concatenate([[1.0], lam[start:stop]]))[1:] \
            .astype(np.float16)

    run.run_chunks(compute, lambda start, stop: e[start:stop])
    return run.result()
