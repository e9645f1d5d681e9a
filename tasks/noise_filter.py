"""Stage 8: Noise Sensor filter, then paste-back into the full frames and the output MP4.

`SETUP`: the clip's noise pattern, its statistics streamed from the stored flow fields a block
at a time. Each chunk then filters its frames with its own frames' sliding-window statistics
(recomputed from the flows around it, so a chunk needs nothing of the others). `FINISH`: the
mean noise pattern (MNP), the heat map, and the output MP4, pasted back into identity frames
decoded again from the input video a chunk at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from freetalk_core import CROP_SIZE, noise_sensor, video
from freetalk_core.paste_back import paste_back
from storage import Store, arrays, sha256_file
from tasks import provenance
from tasks.chunks import FINISH, StageRun
from tasks.common import STAGE_TASK, ItemJob, StageRef, chunk_ranges, mask_weights, read_flows
from tasks.frames import SourceFrames

STAGE = arrays.NOISE_FILTER

SILENT_OUTPUT = ("neither the lip reference nor --audio has an audio track: the output is silent "
                 "(give --audio FILE, or an audio column in a manifest, for sound)")
"""The warning for an item without any audio, on the command line and in the run log."""


def output_audio(job: ItemJob) -> str | None:
    """The file whose audio the output carries: the given audio, else the lip reference's
    when it has an audio stream, else None (a silent output, `SILENT_OUTPUT`)."""
    if job.audio:
        return job.audio
    return job.lip_ref if video.has_audio(job.lip_ref) else None


def _flow_reader(store: Store, item: str):
    g = store.array(item, arrays.GENERATED_FLOW)
    r = store.array(item, arrays.REFERENCE_FLOW)
    return lambda start, stop: (read_flows(g, start, stop), read_flows(r, start, stop))


def statistics_window(job: ItemJob, n_flows: int) -> int:
    """Flow fields per window: `noise_window`, or the whole clip when it is no longer."""
    return job.noise_window if n_flows > job.noise_window else n_flows


def pasted_frames(store: Store, job: ItemJob):
    """Full-resolution output frames: identity frames (decoded from the identity video a chunk
    at a time) with the filtered mouth pasted in."""
    item = job.item_id
    crops = store.array(item, arrays.FILTERED_FRAMES)
    masks = store.array(item, arrays.MOUTH_MASKS)
    transforms = store.read(item, arrays.CROP_TRANSFORMS["identity"])
    id_index = store.read(item, arrays.SOURCE_INDEX["identity"])
    chunks = chunk_ranges(crops.shape[0], job.chunk_frames)
    identity = SourceFrames(job.identity, job.fps, id_index, chunks)
    for start, stop in chunks:
        frames = identity(start, stop)
        crop_block, mask_block = crops[start:stop], mask_weights(masks[start:stop])
        for t in range(start, stop):
            yield paste_back(frames[id_index[t]], crop_block[t - start], transforms[t], mask_block[t - start])


@task(name=STAGE, **STAGE_TASK)
def noise_filter(job: ItemJob, key: str, crops: StageRef, generated: StageRef,
                 flows: StageRef) -> StageRef:
    """`noise_pattern (512, 512) float32` (for a clip longer than `noise_window` flow fields,
    the mean of its per-frame sliding-window patterns), filtered `frames` (inside each frame's
    mouth mask, 0 outside it), MNP, and the output MP4."""
    item, n = job.item_id, generated.frames
    run = StageRun(job, STAGE, key, n, setup=True, finish=True)
    store = run.store
    output = store.output_path(item)
    if run.complete and output.exists():
        return run.result()
    if not output.exists():
        run.done.discard(FINISH)
    x0, y0, x1, y1 = store.attrs(item, arrays.OPTICAL_FLOW)["box"]
    n_flows = n - 1
    filtered = n > 2
    read = _flow_reader(store, item) if filtered else None
    window = statistics_window(job, n_flows) if filtered else 0

    def setup():
        pattern = np.zeros((CROP_SIZE, CROP_SIZE), np.float32)
        if filtered:
            shift = noise_sensor.flow_means(read, n_flows, job.chunk_frames)
            store.write_array(item, arrays.FLOW_MEAN_GENERATED, shift[0])
            store.write_array(item, arrays.FLOW_MEAN_REFERENCE, shift[1])
            pattern[y0:y1, x0:x1] = noise_sensor.clip_noise_pattern(read, n_flows, window, shift, job.chunk_frames)
        store.write_array(item, arrays.NOISE_PATTERN, pattern)

    run.setup(setup)
    if filtered:
        shift = (store.read(item, arrays.FLOW_MEAN_GENERATED), store.read(item, arrays.FLOW_MEAN_REFERENCE))
    diffused = store.array(item, arrays.GENERATED_FRAMES)
    masks = store.array(item, arrays.MOUTH_MASKS)
    out = store.open_array(item, arrays.FILTERED_FRAMES, diffused.shape, job.chunk_frames)
    half = job.kernel_size // 2

    def read_chunk(start, stop):
        lo, hi = max(0, start - half), min(n, stop + half)
        return lo, hi, diffused[start:stop], diffused[lo:hi, y0:y1, x0:x1], mask_weights(masks[start:stop, y0:y1, x0:x1])

    def compute(start, stop, inputs):
        lo, hi, frames, region, mask = inputs
        if filtered:
            # This chunk's frames' own window statistics, and the ideal flow of its context.
            sigma = np.stack([p for _, p in noise_sensor.window_noise_patterns(
                read, n_flows, window, start, stop, shift, job.chunk_frames)])
            motion = (noise_sensor.ideal_flow_range(read, n_flows, window, lo, hi - 1, shift,
                                                    job.chunk_frames)
                      if job.filter_along_motion else None)
            frames[:, y0:y1, x0:x1] = noise_sensor.temporal_filter_chunk(
                region, sigma, start, stop, n, job.kernel_size, mask=mask, motion=motion)
        # Only the mouth mask reaches the output (paste-back weighs by it): 0 elsewhere.
        frames[:, y0:y1, x0:x1][mask == 0] = 0
        out[start:stop] = frames

    run.run_chunks(compute, read_chunk)

    def finish():
        pattern = store.read(item, arrays.NOISE_PATTERN)
        mnp = noise_sensor.mean_noise_pattern(pattern, _mean_mask(masks))
        store.record_metrics(item, {"MNP": mnp})
        report = store.report_dir(item)
        report.mkdir(parents=True, exist_ok=True)
        _save_png(report / "noise_pattern.png", noise_sensor.noise_pattern_heatmap(pattern))
        audio = output_audio(job)
        if audio is None:
            get_run_logger().warning("%s: %s", item, SILENT_OUTPUT)
        # Provenance: label and watermark in the frames, metadata tags, signed C2PA manifest.
        if not job.mark:
            get_run_logger().warning("%s: --no-mark: the output carries no watermark", item)
        # Encoded and signed under a temporary name beside the output, then renamed: the
        # output's name only ever holds a whole, signed file.
        partial = store.partial_output_path(item)
        try:
            video.write_video(partial, provenance.marked_frames(pasted_frames(store, job), job),
                              job.fps, audio=audio, metadata=provenance.metadata_tags())
            provenance.sign_output(partial, job, title=output.name)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
        store.record_metrics(item, {"watermarked": float(job.mark)})
        store.set_attrs(item, STAGE, mnp=float(mnp), output=str(output), output_sha256=sha256_file(output),
                        marked=job.mark, watermark_id=provenance.watermark_id(job), label=job.label,
                        statistics_window=int(window), models=job.models)

    run.finish(finish)
    return run.result()


def _mean_mask(masks) -> np.ndarray:
    """`(H, W) float32` mean weight of the stored `(T, H, W) uint8` masks, a block at a time."""
    total = np.zeros(masks.shape[1:], np.float64)
    for start in range(0, masks.shape[0], 64):
        total += mask_weights(masks[start:start + 64]).sum(axis=0)
    return (total / max(1, masks.shape[0])).astype(np.float32)


def _save_png(path: Path, image: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    shutil.move(tmp, path)
