"""Stage 3: structure frames: identity shape, pose and texture with the lip reference's mouth.

A structure frame is its identity crop above the nose and the rendered lower face below it.
The store keeps only what the render changed: `frames` holds the structure frame where it
differs from the identity crop and 0 elsewhere, `changed (T, 512, 512) bool` says where;
`tasks.frames.StoredStructureFrames` puts the two back together over the identity crops.
"""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE
from freetalk_core.fit_3dmm import load_face_model
from freetalk_core.structure_render import StructureFrames
from storage import arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, load_cached, load_fit
from tasks.frames import Crops

STAGE = arrays.STRUCTURE_RENDER


@task(name=STAGE, **STAGE_TASK)
def structure_render(job: ItemJob, key: str, crops: StageRef, fits: StageRef) -> StageRef:
    """Render the structure frames, a chunk of frames at a time (a long clip's crops are never
    all in memory; a crash resumes at the first missing chunk), and keep what they change."""
    item, n = job.item_id, crops.frames
    run = StageRun(job, STAGE, key, n)
    if run.complete:
        return run.result()
    store = run.store
    model = load_cached("face model", lambda: load_face_model(job.models_dir / "eos"),
                        models=job.models_dir, components=("eos",))
    identity_crops = Crops(store, item, "identity", job.identity)
    frames = StructureFrames(
        model, identity_crops, store.read(item, arrays.LANDMARKS["identity"]),
        load_fit(store, item, "identity"), store.read(item, arrays.LANDMARKS["lip_ref"]))
    layer = store.open_array(item, arrays.STRUCTURE_LAYER, (n, CROP_SIZE, CROP_SIZE, 3), job.chunk_frames)
    changed = store.open_array(item, arrays.STRUCTURE_CHANGED, (n, CROP_SIZE, CROP_SIZE), job.chunk_frames)

    def compute(start, stop, block):
        rendered = np.stack([frames.frame(t, block[t - start]) for t in range(start, stop)])
        differs = (rendered != block).any(axis=-1)
        layer[start:stop] = np.where(differs[..., None], rendered, 0)
        changed[start:stop] = differs

    run.run_chunks(compute, identity_crops.reader(run.pending_ranges()))
    return run.result()
