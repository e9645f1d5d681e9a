"""Stage 3: structure frames: identity shape, pose and texture with the lip reference's mouth."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE
from freetalk_core import fit_3dmm as fit
from freetalk_core import structure_render as sr
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, load_cached
from tasks.fit_3dmm import load_fit

STAGE = "structure_render"


@task(name="structure_render", **STAGE_TASK)
def structure_render(job: ItemJob, key: str, crops: StageRef, fits: StageRef) -> StageRef:
    """Render `structure_render/frames` `(T, 512, 512, 3) uint8`, a chunk of frames at a time
    (a long clip's crops are never all in memory; a crash resumes at the first missing chunk)."""
    item, n = job.item_id, crops.frames
    run = StageRun(job, STAGE, key, n)
    if run.complete:
        run.close()
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
    store = run.store
    model = load_cached("face model", lambda: fit.load_face_model(job.models_dir / "eos"),
                        models=job.models_dir, components=("eos",))
    identity_crops = store.array(item, "face_crop", "identity_crops")
    frames = sr.StructureFrames(
        model, identity_crops, store.read(item, "face_crop", "identity_landmarks"),
        load_fit(store, item, "identity"), store.read(item, "face_crop", "lip_ref_landmarks"))
    out = store.open_array(item, STAGE, "frames", (n, CROP_SIZE, CROP_SIZE, 3), np.uint8, job.chunk_frames)

    def compute(start, stop, block):
        out[start:stop] = np.stack([frames.frame(t, block[t - start]) for t in range(start, stop)])

    run.run_chunks(compute, lambda start, stop: identity_crops[start:stop])
    run.close()
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
