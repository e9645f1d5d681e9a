"""Stage 4: CLIP structure embeddings, the negative embedding, the ArcFace identity embedding."""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core.clip_embed import (
    identity_embedding,
    load_arcface,
    load_image_encoder,
    negative_embedding,
    structure_embeddings,
)
from storage import arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, load_cached, resolve_device
from tasks.frames import Crops, StoredStructureFrames

STAGE = arrays.CLIP_EMBED
IDENTITY_SAMPLE = 64
"""Identity frames (evenly spread over the clip, faces only) averaged into its embedding."""


@task(name=STAGE, **STAGE_TASK)
def clip_embed(job: ItemJob, key: str, crops: StageRef, structure: StageRef) -> StageRef:
    """`structure_embeddings (T, 257, D) float16`, `negative_embedding (257, D)`,
    `identity_embedding (512,)`."""
    item, n = job.item_id, structure.frames
    run = StageRun(job, STAGE, key, n, setup=True)
    if run.complete:
        return run.result()
    store = run.store
    device = resolve_device(job.device)
    encoder = load_cached("image encoder", lambda: load_image_encoder(job.models_dir, device=device),
                          models=job.models_dir, components=("image_encoder",), device=device)

    def setup():
        store.write_array(item, arrays.NEGATIVE_EMBEDDING, negative_embedding(encoder).astype(np.float16))
        arcface = load_cached("arcface", lambda: load_arcface(job.models_dir), models=job.models_dir,
                              components=("insightface",))
        id_index = store.read(item, arrays.SOURCE_INDEX["identity"])
        _, first = np.unique(id_index, return_index=True)
        found = store.read(item, arrays.FACE_FOUND["identity"])
        first = first[found[first]]
        # A bounded, evenly spread sample of identity frames keeps long clips cheap.
        first = np.sort(first[np.linspace(0, len(first) - 1, min(len(first), IDENTITY_SAMPLE))
                              .round().astype(int)])
        landmarks = store.read(item, arrays.LANDMARKS["identity"])
        crops = Crops(store, item, "identity", job.identity).take(first)
        identity = identity_embedding(arcface, crops, landmarks[first])
        store.write_array(item, arrays.IDENTITY_EMBEDDING, identity.astype(np.float32))

    run.setup(setup)
    # The structure embeddings have the negative embedding's (tokens, width).
    token_shape = store.array(item, arrays.NEGATIVE_EMBEDDING).shape
    out = store.open_array(item, arrays.STRUCTURE_EMBEDDINGS, (n,) + tuple(token_shape), job.chunk_frames)

    def compute(start, stop, frames):
        out[start:stop] = structure_embeddings(encoder, frames).astype(np.float16)

    run.run_chunks(compute, StoredStructureFrames(store, item, job.identity).reader(run.pending_ranges()))
    return run.result()
