"""The whole `generate` flow on 1-second clips of two different people, tiny models, CPU."""

import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import generate_beside_store, outside_mouth_masks, write_sample_pair

from storage import STAGES, Store, arrays
from tasks.common import mask_weights, read_flows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_second_pair(tmp_path_factory, samples_dir):
    return list(write_sample_pair(tmp_path_factory.mktemp("clips"), samples_dir, 25,
                                  names=("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"),
                                  identity_audio=True))


def _run(job):
    start = time.perf_counter()
    out = generate_beside_store(job)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_models, one_second_pair):
    from flows.generate import make_job

    store = tmp_path_factory.mktemp("run") / "store"
    job = make_job(*one_second_pair, store=store, models=tiny_models, steps=2, batch_size=4,
                   chunk_frames=10)
    out, seconds = _run(job)
    return job, out, seconds


def _psnr(a, b, weight):
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2 * weight[..., None]).sum()
    mse = err / max(weight.sum() * 3, 1)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_output_has_identity_size_lip_duration_and_audio(first_run):
    job, out, _ = first_run
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert (stream.width, stream.height) == (512, 512)
    assert abs(len(frames) - 25) <= 1
    from freetalk_core import video

    info = video.probe(out)
    assert info.has_audio
    assert abs(video.audio_duration(out) - info.duration) < 0.1


def test_store_holds_every_stage_done(first_run):
    job, _, _ = first_run
    store = Store(job.store)
    assert store.item(job.item_id)["status"] == "done"
    assert store.item(job.item_id)["n_frames"] == 25
    rows = store.stage_rows(job.item_id)
    assert {r["stage"] for r in rows if r["status"] == "done"} == set(STAGES)
    for stage in STAGES:
        assert store.has_stage_group(job.item_id, stage), stage
    assert store.read(job.item_id, arrays.STRUCTURE_CHANGED).shape == (25, 512, 512)
    assert store.read(job.item_id, arrays.GENERATED_FRAMES).shape == (25, 512, 512, 3)
    assert store.read(job.item_id, arrays.NOISE_PATTERN).shape == (512, 512)
    assert "MNP" in store.metrics(job.item_id)[job.item_id]


def test_output_equals_identity_outside_the_mouth_mask(first_run):
    from freetalk_core import video

    job, out, _ = first_run
    identity = video.read_video(job.identity, fps=25.0)
    output = video.read_video(out, fps=25.0)
    for t, ident, outside in outside_mouth_masks(Store(job.store), job.item_id, identity, len(output)):
        assert outside.mean() > 0.5
        assert _psnr(output[t], ident, outside.astype(np.float64)) > 35


def test_every_stored_array_is_in_the_catalogue_as_declared(first_run):
    """Each array the run wrote is a catalogue entry (and each entry was written), with its
    declared dtype and chunking; a named size is the same in every array that has it."""
    import zarr

    job, _, _ = first_run
    store = Store(job.store)
    group = store.item_group(job.item_id)
    assert set(group.group_keys()) == set(STAGES)
    written = {f"{stage}/{name}": array for stage in STAGES for name, array in group[stage].arrays()}
    assert set(written) == {path for path, spec in arrays.CATALOGUE.items() if spec.stage in STAGES}
    n = store.item(job.item_id)["n_frames"]
    x0, y0, x1, y1 = store.attrs(job.item_id, arrays.OPTICAL_FLOW)["box"]
    sizes = {"T": n, "F": n - 1, "crop": 512, "h": y1 - y0, "w": x1 - x0}
    for path, array in sorted(written.items()):
        spec = arrays.CATALOGUE[path]
        assert array.dtype == spec.dtype, path
        assert len(array.shape) == len(spec.shape), path
        for declared, size in zip(spec.shape, array.shape):
            expected = declared if isinstance(declared, int) else sizes.setdefault(declared, size)
            assert size == expected, (path, declared)
        shape, frames = array.shape, min(job.chunk_frames, array.shape[0]) if array.shape else None
        if spec.chunking == arrays.FRAMES:
            assert (array.chunks, array.shards) == ((frames,) + shape[1:], None), path
        elif spec.chunking == arrays.TILED:
            assert array.shards == (frames,) + shape[1:], path
            assert array.chunks == (frames, arrays.MASK_TILE, arrays.MASK_TILE) + shape[3:], path
        else:
            auto = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype=array.dtype, chunks="auto")
            assert (array.chunks, array.shards) == (auto.chunks, None), path
    assert sizes["S"] == sum(len(np.unique(store.read(job.item_id, arrays.SOURCE_INDEX[role])))
                             for role in arrays.ROLES)
    for stage in STAGES:
        assert set(store.attrs(job.item_id, stage)) <= set(arrays.STAGE_ATTRS[stage]), stage


def test_second_run_recomputes_nothing(first_run):
    job, _, first_seconds = first_run
    store = Store(job.store)
    rows_before = len(store._read("stages"))
    _, seconds = _run(job)
    assert len(store._read("stages")) == rows_before  # no stage ran again
    assert seconds < first_seconds


def test_cli_reports_missing_models_in_one_line(tmp_path, one_second_pair):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", *map(str, one_second_pair), "-o",
         str(tmp_path / "o.mp4"), "--models", str(tmp_path / "nothing"), "--store", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "freetalk models" in lines[0]


@pytest.mark.parametrize("option, message", [(["--kernel-size", "4"], "--kernel-size must be odd"),
                                             (["--flow-reference", "audio"], "--flow-reference must be")])
def test_cli_rejects_bad_noise_sensor_settings_in_one_line(tmp_path, one_second_pair, option, message):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", *map(str, one_second_pair), "-o",
         str(tmp_path / "o.mp4"), "--store", str(tmp_path / "s"), *option],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_previews_show_the_panels_and_the_lip_curves(first_run, tmp_path):
    from flows.preview import PANEL_SIZE, lip_opening_curves, write_previews

    job, _, _ = first_run
    png, mp4, plot = write_previews(Path(job.store), job.item_id, tmp_path, stem="p")
    image = __import__("cv2").imread(str(png))
    assert image.shape[1] == 4 * PANEL_SIZE and image.shape[0] % PANEL_SIZE == 0
    with av.open(str(mp4)) as container:
        assert container.streams.video[0].frames == 25
    assert plot.stat().st_size > 10_000
    curves = lip_opening_curves(Store(job.store), job.item_id)
    assert set(curves) == {"lip reference", "structure"}
    for curve in curves.values():
        assert curve.shape == (25,) and np.isfinite(curve).mean() > 0.9
    # The structure frames open and close their mouth with the lip reference.
    a, b = curves["lip reference"], curves["structure"]
    ok = np.isfinite(a) & np.isfinite(b)
    assert np.corrcoef(a[ok], b[ok])[0, 1] > 0.8


def test_noise_filter_stage_uses_a_sliding_window_and_equals_the_whole_clip_filter(tmp_path, tiny_models,
                                                                                   one_second_pair):
    from flows.generate import make_job
    from freetalk_core import noise_sensor

    job = make_job(*one_second_pair, store=tmp_path / "store", models=tiny_models, steps=2, batch_size=4,
                   chunk_frames=10, noise_window=8)
    _run(job)
    store = Store(job.store)
    item = job.item_id
    x0, y0, x1, y1 = store.attrs(item, arrays.OPTICAL_FLOW)["box"]
    g = read_flows(store.array(item, arrays.GENERATED_FLOW))
    r = read_flows(store.array(item, arrays.REFERENCE_FLOW))
    per_frame = noise_sensor.noise_pattern_sequence(g, r, 8)
    # 24 flow fields, windows of 8: a local estimate per frame, not one for the clip
    assert not np.allclose(per_frame[0], per_frame[-1])
    np.testing.assert_allclose(store.read(item, arrays.NOISE_PATTERN)[y0:y1, x0:x1],
                               per_frame.mean(axis=0), rtol=1e-6)
    # Filtered in chunks of 10 frames, along the motion: the same as the whole clip at once.
    generated = store.read(item, arrays.GENERATED_FRAMES)
    masks = mask_weights(store.read(item, arrays.MOUTH_MASKS))
    whole = noise_sensor.temporal_filter(generated[:, y0:y1, x0:x1], per_frame, 5, masks[:, y0:y1, x0:x1],
                               motion=noise_sensor.ideal_flow(g, r, 8))
    # Each chunk streams its own window statistics: equal up to float rounding, which can move
    # a pixel by one grey level where a value sits on a rounding boundary.
    stored = store.read(item, arrays.FILTERED_FRAMES)[:, y0:y1, x0:x1]
    inside = masks[:, y0:y1, x0:x1] > 0
    diff = np.abs(stored.astype(int) - whole.astype(int))[inside]
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert not stored[~inside].any()  # only what the paste-back uses is kept


def test_structure_frames_rendered_in_chunks_equal_the_whole_clip_render(first_run):
    from freetalk_core import fit_3dmm, structure_render
    from tasks.common import load_fit
    from tasks.frames import Crops, StoredStructureFrames

    job, _, _ = first_run
    store, item = Store(job.store), job.item_id
    stored = StoredStructureFrames(store, item)[:]
    assert stored.shape == (25, 512, 512, 3) and job.chunk_frames == 10  # three chunks
    crops = Crops(store, item, "identity")[:]
    whole = structure_render.render_structure_frames(
        fit_3dmm.load_face_model(job.models_dir / "eos"), crops, store.read(item, arrays.LANDMARKS["identity"]),
        load_fit(store, item, "identity"), store.read(item, arrays.LANDMARKS["lip_ref"]))
    np.testing.assert_array_equal(stored, whole)
    # The store keeps only what the render changed: the lower face, nothing above the nose.
    changed = store.read(item, arrays.STRUCTURE_CHANGED)
    np.testing.assert_array_equal(changed, (whole != crops).any(axis=-1))
    layer = store.read(item, arrays.STRUCTURE_LAYER)
    assert not layer[~changed].any() and 0.02 < changed.mean() < 0.6


def test_crops_are_made_again_from_the_inputs(first_run):
    from freetalk_core import face_crop, video
    from tasks.frames import Crops

    job, _, _ = first_run
    store, item = Store(job.store), job.item_id
    for role, path in (("identity", job.identity), ("lip_ref", job.lip_ref)):
        assert not (store.item_path(item) / "face_crop" / f"{role}_crops").exists()
        crops = Crops(store, item, role, path)
        frames = video.read_video(path, fps=25.0)
        index = store.read(item, arrays.SOURCE_INDEX[role])
        transforms = store.read(item, arrays.CROP_TRANSFORMS[role])
        expected = np.stack([face_crop.warp_to_crop(frames[index[t]], transforms[t]) for t in range(len(index))])
        np.testing.assert_array_equal(crops[:], expected)
        np.testing.assert_array_equal(crops[7], expected[7])
        np.testing.assert_array_equal(crops[[20, 3, 11]], expected[[20, 3, 11]])
        # A reader over overlapping ranges (optical flow's chunks share a frame) decodes in order.
        read = crops.reader([(0, 11), (10, 21), (20, 25)])
        for start, stop in ((0, 11), (10, 21), (20, 25)):
            np.testing.assert_array_equal(read(start, stop), expected[start:stop])
    # Without a path: the video the items table records (the last role's, lip_ref).
    np.testing.assert_array_equal(Crops(store, item, "lip_ref")[2], expected[2])


def test_lip_reference_landmarks_are_each_frames_own_on_crops_of_the_smoothed_track(first_run):
    from freetalk_core import face_crop, video

    job, _, _ = first_run
    store, item = Store(job.store), job.item_id
    frames = video.read_video(job.lip_ref, fps=25.0)
    tracked, found = face_crop.track_landmarks(iter(frames), face_crop.LandmarkDetector())
    smoothed, _ = face_crop.fill_and_smooth(tracked, found)
    index = store.read(item, arrays.SOURCE_INDEX["lip_ref"])
    transforms = store.read(item, arrays.CROP_TRANSFORMS["lip_ref"])
    np.testing.assert_allclose(transforms, face_crop.crop_transforms(smoothed)[index], atol=1e-4)
    stored = store.read(item, arrays.LANDMARKS["lip_ref"])
    seen = found[index]
    assert seen.mean() > 0.9
    own = face_crop.transform_points(tracked[index], transforms[:, None])
    np.testing.assert_allclose(stored[seen], own[seen], atol=1e-3)
    # Not the smoothed track: the mouth follows what each frame shows.
    assert np.abs(stored - face_crop.transform_points(smoothed[index], transforms[:, None])).max() > 0.2
