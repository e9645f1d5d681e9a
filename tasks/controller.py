"""Stage 5: Anchor / Structure Controller."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import controller as ctl
from tasks.common import STAGE_CACHE, ItemJob, StageRef, is_transient, recorded_chunk

STAGE = "controller"


@task(name="controller", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def controller(job: ItemJob, key: str, crops: StageRef, embeddings: StageRef) -> StageRef:
    """`lip_distance (T,)`, `lambdas (T,)`, `anchor_index`, `embeddings (T, 257, D) float16`."""
    store = job.open_store()
    item = job.item_id
    if 0 not in store.done_chunks(item, STAGE, key):
        with recorded_chunk(store, item, STAGE, 0, key, frames=embeddings.frames):
            store.stage_group(item, STAGE, reset=True)
            h = ctl.lip_distance(store.read(item, "face_crop", "lip_ref_landmarks"))
            anchor = ctl.anchor_index(h)
            lam = ctl.lambdas(h, tuple(job.lambda_range))
            e = store.array(item, "clip_embed", "structure_embeddings")
            e_anchor = e[anchor:anchor + 1]
            out = store.create_array(item, STAGE, "embeddings", e.shape, np.float16, job.chunk_frames)
            for start in range(0, e.shape[0], job.chunk_frames):
                stop = min(start + job.chunk_frames, e.shape[0])
                block = np.concatenate([e_anchor, e[start:stop]]).astype(np.float32)
                lam_block = np.concatenate([[1.0], lam[start:stop]])
                out[start:stop] = ctl.adjust_embeddings(block, 0, lam_block)[1:].astype(np.float16)
            store.write_array(item, STAGE, "lip_distance", h.astype(np.float32))
            store.write_array(item, STAGE, "lambdas", lam.astype(np.float32))
            store.write_array(item, STAGE, "anchor_index", np.array(anchor, dtype=np.int64))
            store.set_attrs(item, STAGE, anchor_index=anchor)
    return StageRef(item_id=item, stage=STAGE, key=key, frames=embeddings.frames)
