"""Stage 1: decode both videos, track landmarks, align 512x512 crops, mouth masks."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE, video
from freetalk_core import face_crop as fc
from storage import Store
from tasks.common import STAGE_CACHE, ItemJob, StageRef, chunk_ranges, is_transient, load_cached, recorded_chunk

STAGE = "face_crop"


def _store_frames(frames: Iterable[np.ndarray], store: Store, item_id: str, name: str,
                  chunk_frames: int) -> Iterator[np.ndarray]:
    """Pass frames through while writing them to `face_crop/<name>` in whole chunks."""
    array = None
    buffer: list[np.ndarray] = []
    written = 0

    def flush():
        nonlocal array, written
        block = np.stack(buffer)
        if array is None:
            array = store.create_array(item_id, STAGE, name, (0,) + block.shape[1:], np.uint8,
                                       chunk_frames)
        array.resize((written + len(block),) + block.shape[1:])
        array[written:written + len(block)] = block
        written += len(block)
        buffer.clear()

    for frame in frames:
        buffer.append(frame)
        yield frame
        if len(buffer) == chunk_frames:
            flush()
    if buffer:
        flush()


def _track(path: str, job: ItemJob, store: Store, name: str, detector) -> tuple[np.ndarray, ...]:
    frames = _store_frames(video.read_frames(path, fps=job.fps), store, job.item_id,
                           f"{name}_frames", job.chunk_frames)
    landmarks, found = fc.track_landmarks(frames, detector)
    smoothed, passthrough = fc.fill_and_smooth(landmarks, found, source=path)
    return smoothed, found, passthrough


def _warp_range(frames, indices: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Crops of `frames[indices]`, reading the covering range of the Zarr array once."""
    low, high = int(indices.min()), int(indices.max()) + 1
    block = frames[low:high]
    return np.stack([fc.warp_to_crop(block[i - low], transforms[i], CROP_SIZE) for i in indices])


def output_length(job: ItemJob, n_lip_frames: int) -> int:
    """Frames in the output: the lip reference's, or the given audio's duration."""
    if job.audio:
        return max(1, video.output_frame_count(video.audio_duration(job.audio), job.fps))
    return n_lip_frames


@task(name="face_crop", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def face_crop(job: ItemJob, key: str) -> StageRef:
    """Crops, landmarks, transforms and mouth masks for every output frame."""
    store = job.open_store()
    if 0 in store.done_chunks(job.item_id, STAGE, key):
        return StageRef(item_id=job.item_id, stage=STAGE, key=key,
                        frames=store.attrs(job.item_id, STAGE)["n_frames"])

    with recorded_chunk(store, job.item_id, STAGE, 0, key) as row:
        store.stage_group(job.item_id, STAGE, reset=True)
        detector = load_cached("landmark detector", fc.LandmarkDetector)
        id_lm, id_found, id_pass = _track(job.identity, job, store, "identity", detector)
        lip_lm, lip_found, _ = _track(job.lip_ref, job, store, "lip_ref", detector)
        n_frames = output_length(job, len(lip_lm))
        id_index = video.pingpong_indices(len(id_lm), n_frames)
        lip_index = video.pingpong_indices(len(lip_lm), n_frames)
        id_m = fc.crop_transforms(id_lm, CROP_SIZE)
        lip_m = fc.crop_transforms(lip_lm, CROP_SIZE)

        def per_output(name, values, index, dtype):
            store.write_array(job.item_id, STAGE, name, np.asarray(values)[index].astype(dtype),
                              job.chunk_frames)

        per_output("identity_index", np.arange(len(id_lm)), id_index, np.int64)
        per_output("lip_ref_index", np.arange(len(lip_lm)), lip_index, np.int64)
        per_output("identity_transforms", id_m, id_index, np.float32)
        per_output("lip_ref_transforms", lip_m, lip_index, np.float32)
        per_output("identity_face_found", id_found, id_index, bool)
        per_output("lip_ref_face_found", lip_found, lip_index, bool)
        per_output("identity_passthrough", id_pass, id_index, bool)
        id_crop_lm = fc.transform_points(id_lm, id_m[:, None])
        lip_crop_lm = fc.transform_points(lip_lm, lip_m[:, None])
        per_output("identity_landmarks", id_crop_lm, id_index, np.float32)
        per_output("lip_ref_landmarks", lip_crop_lm, lip_index, np.float32)

        crop_shape = (n_frames, CROP_SIZE, CROP_SIZE, 3)
        id_crops = store.create_array(job.item_id, STAGE, "identity_crops", crop_shape, np.uint8,
                                      job.chunk_frames)
        lip_crops = store.create_array(job.item_id, STAGE, "lip_ref_crops", crop_shape, np.uint8,
                                       job.chunk_frames)
        masks = store.create_array(job.item_id, STAGE, "mouth_masks", crop_shape[:3], np.float32,
                                   job.chunk_frames)
        id_frames = store.array(job.item_id, STAGE, "identity_frames")
        lip_frames = store.array(job.item_id, STAGE, "lip_ref_frames")
        for start, stop in chunk_ranges(n_frames, job.chunk_frames):
            ids, lips = id_index[start:stop], lip_index[start:stop]
            id_crops[start:stop] = _warp_range(id_frames, ids, id_m)
            lip_crops[start:stop] = _warp_range(lip_frames, lips, lip_m)
            masks[start:stop] = np.stack([
                np.zeros((CROP_SIZE, CROP_SIZE), np.float32) if id_pass[i]
                else fc.mouth_mask(id_crop_lm[i], CROP_SIZE) for i in ids])
        # The lip reference's full frames are not needed past this stage.
        del store.stage_group(job.item_id, STAGE)["lip_ref_frames"]
        row["frames"] = int(n_frames)
        store.set_attrs(job.item_id, STAGE, n_frames=int(n_frames), fps=float(job.fps),
                        identity_source_frames=int(len(id_lm)),
                        lip_ref_source_frames=int(len(lip_lm)),
                        identity_frames_without_face=int((~id_found).sum()),
                        lip_ref_frames_without_face=int((~lip_found).sum()))
    return StageRef(item_id=job.item_id, stage=STAGE, key=key, frames=int(n_frames))
