"""Stage 3: structure frames: identity shape, pose and texture with the lip reference's mouth."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE
from freetalk_core import fit_3dmm as fit
from freetalk_core import structure_render as sr
from tasks.common import (STAGE_CACHE, ItemJob, StageRef, chunk_ranges, is_transient, load_cached, progress,
                          recorded_chunk)
from tasks.fit_3dmm import load_fit

STAGE = "structure_render"


@task(name="structure_render", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def structure_render(job: ItemJob, key: str, crops: StageRef, fits: StageRef) -> StageRef:
    """Render `structure_render/frames` `(T, 512, 512, 3) uint8`, a chunk of frames at a time
    (a long clip's crops are never all in memory; a crash resumes at the first missing chunk)."""
    store = job.open_store()
    item, n = job.item_id, crops.frames
    chunks = chunk_ranges(n, job.chunk_frames)
    done = store.done_chunks(item, STAGE, key)
    if len(done) == len(chunks):
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
    model = load_cached("face model", lambda: fit.load_face_model(job.models_dir / "eos"),
                        models=job.models_dir, components=("eos",))
    identity_crops = store.array(item, "face_crop", "identity_crops")
    frames = sr.StructureFrames(
        model, identity_crops, store.read(item, "face_crop", "identity_landmarks"),
        load_fit(store, item, "identity"), store.read(item, "face_crop", "lip_ref_landmarks"))
    out = store.open_array(item, STAGE, "frames", (n, CROP_SIZE, CROP_SIZE, 3), np.uint8, job.chunk_frames)
    for chunk, (start, stop) in enumerate(chunks):
        progress.update(item, STAGE, chunk, len(chunks))
        if chunk in done:
            continue
        with recorded_chunk(store, item, STAGE, chunk, key, frames=stop - start):
            block = identity_crops[start:stop]
            out[start:stop] = np.stack([frames.frame(t, block[t - start]) for t in range(start, stop)])
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
