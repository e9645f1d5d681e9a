"""Stage 2: fit the 3D morphable face model to both landmark tracks."""

from __future__ import annotations

import dataclasses

import numpy as np
from prefect import task

from freetalk_core import fit_3dmm as fit
from storage import Store
from tasks.common import STAGE_CACHE, ItemJob, StageRef, is_transient, load_cached, recorded_chunk

STAGE = "fit_3dmm"
ROLES = ("identity", "lip_ref")


def _fit_role(model, store: Store, job: ItemJob, role: str):
    """Fit each distinct source frame once, then spread the result over output frames."""
    landmarks = store.read(job.item_id, "face_crop", f"{role}_landmarks")
    source_index = store.read(job.item_id, "face_crop", f"{role}_index")
    sources, first, inverse = np.unique(source_index, return_index=True, return_inverse=True)
    result = fit.fit_landmarks(model, landmarks[first])
    for field in dataclasses.fields(result):
        value = np.asarray(getattr(result, field.name))
        if value.ndim and value.shape[0] == len(sources):
            value = value[inverse]
        store.write_array(job.item_id, STAGE, f"{role}_{field.name}", value, job.chunk_frames)
    return result


def load_fit(store: Store, item_id: str, role: str):
    """The `FitResult` of `role` ("identity" or "lip_ref"), one entry per output frame."""
    values = {}
    for field in dataclasses.fields(fit.FitResult):
        value = store.read(item_id, STAGE, f"{role}_{field.name}")
        values[field.name] = value.item() if value.ndim == 0 else value
    return fit.FitResult(**values)


@task(name="fit_3dmm", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def fit_3dmm(job: ItemJob, key: str, crops: StageRef) -> StageRef:
    """Identity shape (one per clip), per-frame pose and expression for both videos."""
    store = job.open_store()
    if 0 not in store.done_chunks(job.item_id, STAGE, key):
        with recorded_chunk(store, job.item_id, STAGE, 0, key, frames=crops.frames):
            store.stage_group(job.item_id, STAGE, reset=True)
            model = load_cached("face model", lambda: fit.load_face_model(job.models_dir / "eos"),
                                models=job.models_dir, components=("eos",))
            identity = _fit_role(model, store, job, "identity")
            lip_ref = _fit_role(model, store, job, "lip_ref")
            store.write_array(job.item_id, STAGE, "identity_shape", fit.identity_shape(identity))
            store.set_attrs(job.item_id, STAGE,
                            identity_fit_error_px=float(np.mean(identity.fit_error)),
                            lip_ref_fit_error_px=float(np.mean(lip_ref.fit_error)))
    return StageRef(item_id=job.item_id, stage=STAGE, key=key, frames=crops.frames)
