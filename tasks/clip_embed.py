"""Stage 4: CLIP structure embeddings, the negative embedding, the ArcFace identity embedding."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import clip_embed as ce
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

STAGE = "clip_embed"


@task(name="clip_embed", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def clip_embed(job: ItemJob, key: str, crops: StageRef, structure: StageRef) -> StageRef:
    """`structure_embeddings (T, 257, D) float16`, `negative_embedding (257, D)`,
    `identity_embedding (512,)`."""
    store = job.open_store()
    item, n = job.item_id, structure.frames
    chunks = chunk_ranges(n, job.chunk_frames)
    done = store.done_chunks(item, STAGE, key)
    if len(done) == len(chunks) + 1:
        return StageRef(item_id=item, stage=STAGE, key=key, frames=n)

    device = resolve_device(job.device)
    encoder = load_cached("image encoder", lambda: ce.load_image_encoder(job.models_dir, device=device),
                          models=job.models_dir, components=("image_encoder",), device=device)
    structure_frames = store.array(item, "structure_render", "frames")
    if -1 not in done:
        with recorded_chunk(store, item, STAGE, -1, key, frames=n):
            negative = ce.negative_embedding(encoder)
            store.write_array(item, STAGE, "negative_embedding", negative.astype(np.float16))
            arcface = load_cached("arcface", lambda: ce.load_arcface(job.models_dir), models=job.models_dir,
                                  components=("insightface",))
            id_index = store.read(item, "face_crop", "identity_index")
            _, first = np.unique(id_index, return_index=True)
            crops_array = store.array(item, "face_crop", "identity_crops")
            landmarks = store.read(item, "face_crop", "identity_landmarks")
            found = store.read(item, "face_crop", "identity_face_found")
            first = first[found[first]]
            # A bounded, evenly spread sample of identity frames keeps long clips cheap.
            first = first[np.linspace(0, len(first) - 1, min(len(first), 64)).round().astype(int)]
            identity = ce.identity_embedding(arcface, crops_array.get_orthogonal_selection(
                (np.sort(first),)), landmarks[np.sort(first)])
            store.write_array(item, STAGE, "identity_embedding", identity.astype(np.float32))
    token_shape = ce.structure_embeddings(encoder, structure_frames[0:1]).shape[1:]
    out = store.open_array(item, STAGE, "structure_embeddings", (n,) + token_shape, np.float16,
                           job.chunk_frames)
    for chunk, (start, stop) in enumerate(chunks):
        progress.update(item, STAGE, chunk, len(chunks))
        if chunk in done:
            continue
        with recorded_chunk(store, item, STAGE, chunk, key, frames=stop - start):
            out[start:stop] = ce.structure_embeddings(encoder, structure_frames[start:stop]).astype(np.float16)
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)
