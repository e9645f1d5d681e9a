"""Stage 2: fit the 3D morphable face model to both landmark tracks.

Each distinct source frame of each video is fitted once, a chunk of source frames at a time
(identity chunks first, then the lip reference's); the `FINISH` unit smooths both clips' fits
over time, computes the fit errors and the identity's shape, and spreads the fits over the
output frames.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from prefect import task

from freetalk_core.fit_3dmm import FitResult, finish_fit, fit_frames, identity_shape, load_face_model
from storage import Store, arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, chunk_ranges, load_cached

STAGE = arrays.FIT_3DMM
ROLES = arrays.ROLES
FIELDS = [f.name for f in dataclasses.fields(FitResult) if f.name != "size"]


def _sources(store: Store, item_id: str, role: str):
    """`(distinct source frames' first output frame, output -> distinct index)`."""
    source_index = store.read(item_id, arrays.SOURCE_INDEX[role])
    _, first, inverse = np.unique(source_index, return_index=True, return_inverse=True)
    return first, inverse


@task(name=STAGE, **STAGE_TASK)
def fit_3dmm(job: ItemJob, key: str, crops: StageRef) -> StageRef:
    """Identity shape (one per clip), per-frame pose and expression for both videos."""
    store, item = job.open_store(), job.item_id
    sources = {role: _sources(store, item, role) for role in ROLES}
    # One axis over both videos' distinct source frames: identity's, then the lip reference's.
    offset = {"identity": 0, "lip_ref": len(sources["identity"][0])}
    total = offset["lip_ref"] + len(sources["lip_ref"][0])
    chunks = (chunk_ranges(offset["lip_ref"], job.chunk_frames)
              + [(offset["lip_ref"] + a, offset["lip_ref"] + b)
                 for a, b in chunk_ranges(total - offset["lip_ref"], job.chunk_frames)])
    run = StageRun(job, STAGE, key, crops.frames, chunks=chunks, finish=True)
    if run.complete:
        return run.result()

    model = load_cached("face model", lambda: load_face_model(job.models_dir / "eos"),
                        models=job.models_dir, components=("eos",))
    landmarks = {role: store.read(item, arrays.LANDMARKS[role])[sources[role][0]]
                 for role in ROLES}
    empty = fit_frames(model, landmarks["identity"][:0])
    raw = {name: store.open_array(item, arrays.RAW_FIT[name], (total,) + getattr(empty, name).shape[1:],
                                  job.chunk_frames) for name in FIELDS}

    def compute(start, stop, _):
        role = "identity" if start < offset["lip_ref"] else "lip_ref"
        a, b = start - offset[role], stop - offset[role]
        result = fit_frames(model, landmarks[role][a:b])
        for name in FIELDS:
            raw[name][start:stop] = getattr(result, name)

    def finish():
        fits = {}
        for role in ROLES:
            a, b = offset[role], offset[role] + len(sources[role][0])
            per_source = FitResult(**{name: raw[name][a:b] for name in FIELDS})
            fits[role] = finish_fit(model, per_source, landmarks[role])
            inverse = sources[role][1]
            for name in FIELDS:
                store.write_array(item, arrays.FIT[role][name], getattr(fits[role], name)[inverse],
                                  job.chunk_frames)
            store.write_array(item, arrays.FIT[role]["size"], np.array(fits[role].size, np.int64))
        store.write_array(item, arrays.IDENTITY_SHAPE, identity_shape(fits["identity"]))
        store.set_attrs(item, STAGE,
                        identity_fit_error_px=float(np.mean(fits["identity"].fit_error)),
                        lip_ref_fit_error_px=float(np.mean(fits["lip_ref"].fit_error)))

    run.run_chunks(compute)
    run.finish(finish)
    return run.result()
