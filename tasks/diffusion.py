"""Stage 6: per-frame inpainting diffusion conditioned on identity and structure."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE
from freetalk_core.diffusion import (
    default_dtype,
    generate_in_batches,
    initial_noise,
    load_pipeline,
    optimize_pipeline,
)
from storage import arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, load_cached, mask_weights, resolve_device
from tasks.frames import Crops, mouth_box_frames

STAGE = arrays.DIFFUSION


@task(name=STAGE, **STAGE_TASK)
def diffusion(job: ItemJob, key: str, crops: StageRef, embeddings: StageRef,
              controlled: StageRef) -> StageRef:
    """`diffusion/frames (T, 512, 512, 3) uint8`: generated crops inside the mouth box
    (`face_crop` attrs `box`), 0 outside it."""
    item, n = job.item_id, controlled.frames
    run = StageRun(job, STAGE, key, n)
    if run.complete:
        return run.result()
    store = run.store
    device = resolve_device(job.device)
    dtype = default_dtype(device)

    def load():
        pipe = load_pipeline(job.models_dir, device=device, dtype=dtype, faceid_variant=job.faceid_variant)
        return optimize_pipeline(pipe) if device == "cuda" else pipe

    kind = "diffusion pipeline" + ("" if job.faceid_variant == "plus" else f" ({job.faceid_variant})")
    pipe = load_cached(kind, load, models=job.models_dir,
                       components=("sd15-inpainting", "ip-adapter"), device=device, dtype=dtype)
    noise = initial_noise(job.seed, CROP_SIZE, CROP_SIZE)
    negative = store.read(item, arrays.NEGATIVE_EMBEDDING).astype(np.float32)
    identity = store.read(item, arrays.IDENTITY_EMBEDDING).astype(np.float32)
    masks = store.array(item, arrays.MOUTH_MASKS)
    adjusted = store.array(item, arrays.ADJUSTED_EMBEDDINGS)
    box = store.attrs(item, arrays.FACE_CROP)["box"]
    out = store.open_array(item, arrays.GENERATED_FRAMES, (n, CROP_SIZE, CROP_SIZE, 3), job.chunk_frames)

    id_crops = Crops(store, item, "identity", job.identity).reader(run.pending_ranges())

    def read(start, stop):
        return id_crops(start, stop), mask_weights(masks[start:stop]), adjusted[start:stop].astype(np.float32)

    def compute(start, stop, inputs):
        frames, chunk_masks, embeddings_in = inputs
        out[start:stop] = mouth_box_frames(generate_in_batches(
            pipe, frames, chunk_masks, embeddings_in, negative, identity, noise,
            batch_size=job.batch_size, steps=job.steps, guidance=job.guidance,
            ip_scale=job.ip_adapter_scale), box)

    run.run_chunks(compute, read)
    return run.result()
