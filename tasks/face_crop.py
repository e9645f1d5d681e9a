"""Stage 1: decode both videos, track landmarks, crop transforms, mouth masks.

The whole-clip part (tracking both videos, filling and smoothing the tracks, crop transforms)
is the `SETUP` unit; mouth masks are then made a chunk of output frames at a time. Neither
decoded frames nor the 512x512 crops are stored: a crop is one decode and one affine warp away
(`tasks.frames.Crops`), far cheaper to redo than to keep (0.55 MB per frame and video, losslessly
compressed), and every stage that needs crops makes them a chunk at a time.
"""

from __future__ import annotations

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE, flow, video
from freetalk_core.face_crop import (
    LandmarkDetector,
    bridge_gaps,
    crop_transforms,
    fill_and_smooth,
    gap_frame_indices,
    make_detector,
    mouth_mask,
    track_landmarks,
    transform_points,
)
from storage import arrays
from tasks.chunks import StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, load_cached, mask_values

STAGE = arrays.FACE_CROP


def mouth_box(masks, margin: int = flow.DEFAULT_BOX_MARGIN) -> tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` around every frame's mask of `masks (T, H, W)` (read 64 frames at a
    time), plus `margin` pixels; the whole crop when every mask is empty."""
    union = np.zeros(masks.shape[1:], dtype=bool)
    for start in range(0, masks.shape[0], 64):
        union |= (masks[start:start + 64] > 0).any(axis=0)
    box = flow.mouth_box(union, margin)
    return box if box is not None else (0, 0, int(masks.shape[2]), int(masks.shape[1]))


def _track(path: str, job: ItemJob, detector, face_index: int = 0, face_box=None) -> tuple[np.ndarray, ...]:
    """Landmarks of every frame of `path`, streamed: one decoded frame in memory at a time;
    then the frames of short gaps decoded again, to tell a missed face from a cut-away.
    Returns the smoothed tracks, found, passthrough and the tracks filled but not smoothed."""
    landmarks, found = track_landmarks(video.read_frames(path, fps=job.fps), detector,
                                       face_index=face_index, face_box=face_box)
    wanted = gap_frame_indices(found) if found.any() else np.zeros(0, np.int64)
    bridged = bridge_gaps(landmarks, found, video.read_frames(path, fps=job.fps, indices=wanted))
    smoothed, passthrough = fill_and_smooth(landmarks, found, bridged, source=path)
    per_frame, _ = fill_and_smooth(landmarks, found, bridged, window=1, source=path)
    return smoothed, found, passthrough, per_frame


def output_length(job: ItemJob, n_lip_frames: int) -> int:
    """Frames in the output: the lip reference's, or the given audio's duration."""
    if job.audio:
        return max(1, video.output_frame_count(video.audio_duration(job.audio), job.fps))
    return n_lip_frames


def _setup(job: ItemJob, run: StageRun) -> None:
    store, item = run.store, job.item_id
    if job.detector == "dlib":
        detector = load_cached("landmark detector", LandmarkDetector)
    else:
        detector = load_cached(f"{job.detector} landmark detector",
                               lambda: make_detector(job.detector, job.models_dir),
                               models=job.models, components=("insightface",))
    id_lm, id_found, id_pass, _ = _track(job.identity, job, detector, job.face_index, job.face_box)
    # The lip reference's crops follow its smoothed track; its landmarks, which drive the mouth,
    # are each frame's own: smoothing over 5 frames blunts the fast closures of speech.
    lip_lm, lip_found, _, lip_per_frame = _track(job.lip_ref, job, detector)
    n_frames = output_length(job, len(lip_lm))
    id_index = video.pingpong_indices(len(id_lm), n_frames)
    lip_index = video.pingpong_indices(len(lip_lm), n_frames)
    id_m = crop_transforms(id_lm, CROP_SIZE)
    lip_m = crop_transforms(lip_lm, CROP_SIZE)

    def per_output(spec, values, index):
        store.write_array(item, spec, np.asarray(values)[index].astype(spec.dtype), job.chunk_frames)

    per_output(arrays.SOURCE_INDEX["identity"], np.arange(len(id_lm)), id_index)
    per_output(arrays.SOURCE_INDEX["lip_ref"], np.arange(len(lip_lm)), lip_index)
    per_output(arrays.CROP_TRANSFORMS["identity"], id_m, id_index)
    per_output(arrays.CROP_TRANSFORMS["lip_ref"], lip_m, lip_index)
    per_output(arrays.FACE_FOUND["identity"], id_found, id_index)
    per_output(arrays.FACE_FOUND["lip_ref"], lip_found, lip_index)
    per_output(arrays.IDENTITY_PASSTHROUGH, id_pass, id_index)
    per_output(arrays.LANDMARKS["identity"], transform_points(id_lm, id_m[:, None]), id_index)
    per_output(arrays.LANDMARKS["lip_ref"], transform_points(lip_per_frame, lip_m[:, None]), lip_index)
    store.set_attrs(item, STAGE, n_frames=int(n_frames), fps=float(job.fps),
                    identity_source_frames=int(len(id_lm)),
                    lip_ref_source_frames=int(len(lip_lm)),
                    identity_frames_without_face=int((~id_found).sum()),
                    identity_passthrough_frames=int(id_pass.sum()),
                    lip_ref_frames_without_face=int((~lip_found).sum()))


@task(name=STAGE, **STAGE_TASK)
def face_crop(job: ItemJob, key: str) -> StageRef:
    """Landmarks, crop transforms and `mouth_masks (T, 512, 512) uint8` (weight * 255) for every
    output frame (the crops themselves: `tasks.frames.Crops`); then (`FINISH`) the mouth `box` around every
    mask, `(x0, y0, x1, y1)` crop px."""
    run = StageRun(job, STAGE, key, None, setup=True, finish=True)
    store, item = run.store, job.item_id
    run.setup(lambda: _setup(job, run))
    attrs = store.attrs(item, STAGE)
    n_frames = int(attrs["n_frames"])
    run.set_frames(n_frames)
    for role in arrays.ROLES:
        if attrs[f"{role}_frames_without_face"]:
            passed = (f" ({attrs['identity_passthrough_frames']} passed through unchanged)"
                      if role == "identity" and "identity_passthrough_frames" in attrs else "")
            run.warn(f"{attrs[f'{role}_frames_without_face']} of {attrs[f'{role}_source_frames']} "
                     f"{role} frames without a face{passed}")
    if run.complete:
        return run.result()

    id_pass = store.read(item, arrays.IDENTITY_PASSTHROUGH)
    id_crop_lm = store.read(item, arrays.LANDMARKS["identity"])
    masks = store.open_array(item, arrays.MOUTH_MASKS, (n_frames, CROP_SIZE, CROP_SIZE), job.chunk_frames)

    def compute(start, stop, _):
        masks[start:stop] = np.stack([
            np.zeros((CROP_SIZE, CROP_SIZE), np.uint8) if id_pass[t]
            else mask_values(mouth_mask(id_crop_lm[t], CROP_SIZE)) for t in range(start, stop)])

    run.run_chunks(compute)
    run.finish(lambda: store.set_attrs(item, STAGE, box=list(mouth_box(masks))))
    return run.result()
