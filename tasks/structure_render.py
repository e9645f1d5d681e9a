"""Stage 3: structure frames: identity shape, pose and texture with the lip reference's mouth."""

from __future__ import annotations

from prefect import task

from freetalk_core import fit_3dmm as fit
from freetalk_core import structure_render as sr
from tasks.common import STAGE_CACHE, ItemJob, StageRef, is_transient, recorded_chunk
from tasks.fit_3dmm import load_fit

STAGE = "structure_render"


@task(name="structure_render", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def structure_render(job: ItemJob, key: str, crops: StageRef, fits: StageRef) -> StageRef:
    """Render `structure_render/frames` `(T, 512, 512, 3) uint8`."""
    store = job.open_store()
    if 0 not in store.done_chunks(job.item_id, STAGE, key):
        with recorded_chunk(store, job.item_id, STAGE, 0, key, frames=crops.frames):
            store.stage_group(job.item_id, STAGE, reset=True)
            model = fit.load_face_model(job.models_dir / "eos")
            read = lambda name: store.read(job.item_id, "face_crop", name)  # noqa: E731
            frames = sr.render_structure_frames(
                model,
                read("identity_crops"), read("identity_landmarks"),
                load_fit(store, job.item_id, "identity"),
                read("lip_ref_landmarks"), load_fit(store, job.item_id, "lip_ref"),
            )
            store.write_array(job.item_id, STAGE, "frames", frames, job.chunk_frames)
    return StageRef(item_id=job.item_id, stage=STAGE, key=key, frames=crops.frames)
