"""Stage 8: Noise Sensor filter, then paste-back into the full frames and the output MP4."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from freetalk_core import CROP_SIZE, video
from freetalk_core import face_crop as fc
from freetalk_core import noise_sensor as ns
from storage import Store, sha256_file
from tasks import provenance
from tasks.common import STAGE_CACHE, ItemJob, StageRef, chunk_ranges, is_transient, progress, recorded_chunk

STAGE = "noise_filter"


def _filter_chunks(store: Store, job: ItemJob, key: str, pattern: np.ndarray, box,
                   motion: np.ndarray | None) -> None:
    """Filter `diffusion/frames` inside the mouth box chunk by chunk. Each chunk reads
    `kernel_size // 2` neighbouring frames on both sides (and the flows between them, when
    `motion` `(T-1, box h, box w, 2)` is given), so it equals filtering the whole clip.
    pattern: `(box h, box w)` for the clip, or `(T, box h, box w)` per frame."""
    item = job.item_id
    x0, y0, x1, y1 = box
    generated = store.array(item, "diffusion", "frames")
    masks = store.array(item, "face_crop", "mouth_masks")
    n = generated.shape[0]
    out = store.open_array(item, STAGE, "frames", generated.shape, np.uint8, job.chunk_frames)
    half = job.kernel_size // 2
    done = store.done_chunks(item, STAGE, key)
    chunks = chunk_ranges(n, job.chunk_frames)
    for chunk, (start, stop) in enumerate(chunks):
        progress.update(item, STAGE, chunk, len(chunks) + 1)
        if chunk in done:
            continue
        with recorded_chunk(store, item, STAGE, chunk, key, frames=stop - start):
            lo, hi = max(0, start - half), min(n, stop + half)
            frames = generated[start:stop]
            region = generated[lo:hi, y0:y1, x0:x1]
            filtered = ns.temporal_filter(region, pattern if pattern.ndim == 2 else pattern[lo:hi], job.kernel_size,
                                          mask=masks[lo:hi, y0:y1, x0:x1],
                                          motion=None if motion is None else motion[lo:hi - 1])
            frames[:, y0:y1, x0:x1] = filtered[start - lo:stop - lo]
            out[start:stop] = frames


def pasted_frames(store: Store, item: str, chunk_frames: int):
    """Full-resolution output frames: identity frames with the filtered mouth pasted in."""
    crops = store.array(item, STAGE, "frames")
    masks = store.array(item, "face_crop", "mouth_masks")
    transforms = store.read(item, "face_crop", "identity_transforms")
    id_index = store.read(item, "face_crop", "identity_index")
    id_frames = store.array(item, "face_crop", "identity_frames")
    for start, stop in chunk_ranges(crops.shape[0], chunk_frames):
        crop_block, mask_block = crops[start:stop], masks[start:stop]
        low, high = int(id_index[start:stop].min()), int(id_index[start:stop].max()) + 1
        frames = id_frames[low:high]
        for t in range(start, stop):
            yield fc.paste_back(frames[id_index[t] - low], crop_block[t - start],
                                transforms[t], mask_block[t - start])


@task(name="noise_filter", cache_policy=STAGE_CACHE, persist_result=True, retries=1, retry_condition_fn=is_transient)
def noise_filter(job: ItemJob, key: str, crops: StageRef, generated: StageRef,
                 flows: StageRef) -> StageRef:
    """`noise_pattern (512, 512) float32` (for a clip longer than `noise_window` flow fields,
    the mean of its per-frame sliding-window patterns), filtered `frames`, MNP, and the
    output MP4."""
    store = job.open_store()
    item, n = job.item_id, generated.frames
    done = store.done_chunks(item, STAGE, key)
    output = store.output_path(item)
    if -1 not in done or not output.exists():
        box = tuple(store.attrs(item, "optical_flow")["box"])
        x0, y0, x1, y1 = box
        pattern = np.zeros((CROP_SIZE, CROP_SIZE), np.float32)
        box_pattern = np.zeros((y1 - y0, x1 - x0), np.float32)
        motion = None
        if n > 2:
            generated_flow = store.read(item, "optical_flow", "generated_flow")
            reference_flow = store.read(item, "optical_flow", "reference_flow")
            window = job.noise_window if n - 1 > job.noise_window else None
            if window:
                # A long clip: each frame's statistics come from the window around it.
                box_pattern = ns.noise_pattern_sequence(generated_flow, reference_flow, window)
                pattern[y0:y1, x0:x1] = box_pattern.mean(axis=0)
            else:
                box_pattern = ns.noise_pattern(generated_flow, reference_flow)
                pattern[y0:y1, x0:x1] = box_pattern
            if job.filter_along_motion:
                # Each pixel is smoothed along its genuine motion: the part of the generated
                # flow the reference explains (Theorem 1's linear estimate), over the same window.
                motion = ns.ideal_flow(generated_flow, reference_flow, window)
            del generated_flow, reference_flow
        _filter_chunks(store, job, key, box_pattern, box, motion)
        with recorded_chunk(store, item, STAGE, -1, key, frames=n):
            store.write_array(item, STAGE, "noise_pattern", pattern)
            mnp = ns.mean_noise_pattern(pattern, _mean_mask(store.array(item, "face_crop", "mouth_masks")))
            store.record_metrics(item, {"MNP": mnp})
            report = store.report_dir(item)
            report.mkdir(parents=True, exist_ok=True)
            _save_png(report / "noise_pattern.png", ns.noise_pattern_heatmap(pattern))
            audio = job.audio or (job.lip_ref if video.has_audio(job.lip_ref) else None)
            output.parent.mkdir(parents=True, exist_ok=True)
            # Provenance: label and watermark in the frames, metadata tags, signed C2PA manifest.
            if not job.mark:
                get_run_logger().warning("%s: --no-mark: the output carries no watermark", item)
            video.write_video(output, provenance.marked_frames(pasted_frames(store, item, job.chunk_frames), job),
                              job.fps, audio=audio, metadata=provenance.metadata_tags())
            provenance.sign_output(output, job)
            store.record_metrics(item, {"watermarked": float(job.mark)})
            store.set_attrs(item, STAGE, mnp=float(mnp), output=str(output),
                            output_sha256=sha256_file(output), marked=job.mark,
                            watermark_id=provenance.watermark_id(job), label=job.label)
    return StageRef(item_id=item, stage=STAGE, key=key, frames=n)


def _mean_mask(masks) -> np.ndarray:
    """`(H, W) float32` mean of `(T, H, W)` masks, read a block at a time."""
    total = np.zeros(masks.shape[1:], np.float64)
    for start in range(0, masks.shape[0], 64):
        total += masks[start:start + 64].sum(axis=0)
    return (total / max(1, masks.shape[0])).astype(np.float32)


def _save_png(path: Path, image: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    shutil.move(tmp, path)
