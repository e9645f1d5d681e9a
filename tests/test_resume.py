"""Stage keys are exact and portable: moving the store or copying the models recomputes
nothing, a setting recomputes only the stages it affects, another chunk size never takes
unwritten frames as done, and `keep="final"` keeps what a rerun needs to do nothing."""

import shutil
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import computed_since, generate_beside_store, write_sample_pair

from storage import STAGES, Store, arrays


@pytest.fixture(scope="module")
def short_pair(tmp_path_factory, samples_dir):
    return list(write_sample_pair(tmp_path_factory.mktemp("clips"), samples_dir, 12,
                                  names=("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"),
                                  identity_audio=True))


def _now():
    time.sleep(0.01)
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def done_item(tmp_path_factory, tiny_models, short_pair):
    from flows.generate import make_job

    root = tmp_path_factory.mktemp("resume")
    settings = dict(steps=1, batch_size=4, chunk_frames=5)
    job = make_job(*short_pair, store=root / "store", models=tiny_models, **settings)
    generate_beside_store(job)
    return root, job, settings


def test_moved_store_and_copied_models_recompute_nothing(done_item, tiny_models, short_pair):
    from flows.generate import make_job, stage_keys

    root, job, settings = done_item
    from freetalk_core import video

    output = video.read_video(Store(job.store).output_path(job.item_id))
    moved = root / "moved-store"
    shutil.move(job.store, moved)
    copied = root / "models-copy"
    shutil.copytree(tiny_models, copied)  # new modification times, same contents
    (copied / ".freetalk-fingerprint.json").unlink(missing_ok=True)
    again = make_job(*short_pair, store=moved, models=copied, **settings)
    assert again.item_id == job.item_id and stage_keys(again) == stage_keys(job)
    since = _now()
    # The last stage's rows alone would let `generate` return early: remove the output so
    # every stage task runs and checks its own rows.
    Store(moved).output_path(job.item_id).unlink()
    generate_beside_store(again)
    store = Store(moved)
    assert computed_since(store, job.item_id, since) == {"noise_filter": 1}  # the MP4 again
    # the same frames (the file's signed manifest carries its own signing time)
    np.testing.assert_array_equal(video.read_video(store.output_path(job.item_id)), output)
    since = _now()
    generate_beside_store(again)
    assert computed_since(store, job.item_id, since) == {}
    shutil.move(moved, job.store)


def test_kernel_size_recomputes_only_the_noise_filter(done_item, short_pair, tiny_models):
    from flows.generate import make_job

    root, job, settings = done_item
    changed = make_job(*short_pair, store=job.store, models=tiny_models, **settings, kernel_size=3)
    assert changed.item_id == job.item_id
    since = _now()
    generate_beside_store(changed)
    store = Store(job.store)
    # setup, the 3 chunks of 12 frames, finish
    assert computed_since(store, job.item_id, since) == {"noise_filter": 5}
    since = _now()
    generate_beside_store(job)
    assert computed_since(store, job.item_id, since) == {"noise_filter": 5}


def test_another_chunk_size_recomputes_every_stage_and_reads_only_written_frames(tmp_path, done_item,
                                                                                 short_pair, tiny_models):
    from flows.generate import make_job, stage_keys

    root, job, settings = done_item
    store_dir = tmp_path / "store"
    shutil.copytree(job.store, store_dir)
    store = Store(store_dir)
    # A run killed after diffusion's first chunk of 5 frames: later chunks were never written.
    rows = [r for r in store.stage_rows(job.item_id) if r["stage"] == "diffusion"]
    for row in rows:
        if row["chunk"] > 0:
            store.record_stage(job.item_id, "diffusion", row["chunk"], "failed", seconds=0, frames=0,
                               cache_key=row["cache_key"], error="killed")
    frames = store.stage_group(job.item_id, arrays.DIFFUSION)[arrays.GENERATED_FRAMES.name]  # writable
    frames[5:] = 0
    store.output_path(job.item_id).unlink()
    resumed = make_job(*short_pair, store=store_dir, models=tiny_models, **{**settings, "chunk_frames": 12})
    new_keys, old_keys = stage_keys(resumed), stage_keys(job)
    assert all(new_keys[s] != old_keys[s] for s in STAGES)
    since = _now()
    generate_beside_store(resumed)
    computed = computed_since(store, job.item_id, since)
    assert set(computed) == set(STAGES)
    assert computed["diffusion"] == 1  # one chunk of 12 frames, none taken as done
    generated = store.read(job.item_id, arrays.GENERATED_FRAMES)
    masks = store.read(job.item_id, arrays.MOUTH_MASKS)
    # every frame was generated: the repainted mouth is never the zero fill of an unwritten chunk
    assert all(generated[t][masks[t] > 128].any() for t in range(len(generated)))


def test_keep_final_drops_arrays_keeps_rows_and_a_rerun_does_nothing(tmp_path, done_item, short_pair,
                                                                     tiny_models):
    from flows.generate import make_job

    root, job, settings = done_item
    store_dir = tmp_path / "store"
    shutil.copytree(job.store, store_dir)
    store = Store(store_dir)
    final = make_job(*short_pair, store=store_dir, models=tiny_models, **settings, keep="final", kernel_size=3)
    generate_beside_store(final)
    assert not store.item_path(job.item_id).exists()
    assert store.output_path(job.item_id).exists()
    assert store.item(job.item_id)["status"] == "done"
    assert "MNP" in store.metrics(job.item_id)[job.item_id]
    assert {r["stage"] for r in store.stage_rows(job.item_id) if r["status"] == "done"} == set(STAGES)
    since = _now()
    generate_beside_store(final)
    assert computed_since(store, job.item_id, since) == {}
    # A changed setting needs the dropped arrays again: everything is recomputed, from nothing.
    since = _now()
    generate_beside_store(make_job(*short_pair, store=store_dir, models=tiny_models, **settings, keep="final"))
    assert set(computed_since(store, job.item_id, since)) == set(STAGES)
    assert not store.item_path(job.item_id).exists()


def test_model_fingerprint_is_the_content_and_is_cached(tmp_path, tiny_models):
    from tasks.common import FINGERPRINT_CACHE, models_fingerprint

    copy = tmp_path / "m"
    shutil.copytree(tiny_models / "eos", copy / "eos")
    first = models_fingerprint(copy, "eos")
    assert first == models_fingerprint(tiny_models, "eos")
    assert (copy / FINGERPRINT_CACHE).is_file()
    some_file = sorted(p for p in (copy / "eos").iterdir() if p.is_file())[0]
    data = some_file.read_bytes()
    some_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert models_fingerprint(copy, "eos") != first
    some_file.write_bytes(data)
    assert models_fingerprint(copy, "eos") == first
