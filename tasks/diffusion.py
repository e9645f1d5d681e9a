"""Stage 6: per-frame inpainting diffusion conditioned on identity and structure."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from prefect import task

from freetalk_core import CROP_SIZE
from freetalk_core import diffusion as dm
from tasks.common import (
    STAGE_CACHE,
    ItemJob,
    StageRef,
    chunk_ranges,
    is_transient,
    load_cached,
    progress,
    recorded_chunk,
    resolve_device,
)

STAGE = "diffusion"


@task(name="diffusion", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def diffusion(job: ItemJob, key: str, crops: StageRef, embeddings: StageRef,
              controlled: StageRef) -> StageRef:
    """`diffusion/frames (T, 512, 512, 3) uint8`: generated crops."""
    store = job.open_store()
    item, n = job.item_id, controlled.frames
    chunks = chunk_ranges(n, job.chunk_frames)
    done = store.done_chunks(item, STAGE, key)
    if len(done) == len(chunks):
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)

    device = resolve_device(job.device)
    dtype = torch.float16 if device == "cuda" else torch.float32

    def load():
        pipe = dm.load_pipeline(job.models_dir, device=device, dtype=dtype)
        return dm.optimize_pipeline(pipe) if device == "cuda" else pipe

    pipe = load_cached("diffusion pipeline", load, models=job.models_dir,
                       components=("sd15-inpainting", "ip-adapter"), device=device, dtype=dtype)
    noise = dm.initial_noise(job.seed, CROP_SIZE, CROP_SIZE)
    negative = store.read(item, "clip_embed", "negative_embedding").astype(np.float32)
    identity = store.read(item, "clip_embed", "identity_embedding").astype(np.float32)
    id_crops = store.array(item, "face_crop", "identity_crops")
    masks = store.array(item, "face_crop", "mouth_masks")
    adjusted = store.array(item, "controller", "embeddings")
    out = store.open_array(item, STAGE, "frames", (n, CROP_SIZE, CROP_SIZE, 3), np.uint8,
                           job.chunk_frames)
    todo = [(chunk, start, stop) for chunk, (start, stop) in enumerate(chunks) if chunk not in done]

    def read_inputs(start: int, stop: int):
        return id_crops[start:stop], masks[start:stop], adjusted[start:stop].astype(np.float32)

    # The next chunk's inputs are read and decompressed from the store while the current
    # chunk is generated.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion-read") as reader:
        upcoming = reader.submit(read_inputs, *todo[0][1:]) if todo else None
        for i, (chunk, start, stop) in enumerate(todo):
            progress.update(item, STAGE, chunk, len(chunks))
            frames, chunk_masks, embeddings_in = upcoming.result()
            if i + 1 < len(todo):
                upcoming = reader.submit(read_inputs, *todo[i + 1][1:])
            with recorded_chunk(store, item, STAGE, chunk, key, frames=stop - start):
                out[start:stop] = dm.generate_in_batches(
                    pipe, frames, chunk_masks, embeddings_in, negative, identity, noise,
                    batch_size=job.batch_size, steps=job.steps, guidance=job.guidance,
                    ip_scale=job.ip_adapter_scale)
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
