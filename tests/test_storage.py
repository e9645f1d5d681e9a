import os

import numpy as np
import pyarrow.dataset as ds
import pytest

from storage import STAGES, Store


def test_item_rows_keep_latest_and_previous_fields(tmp_path):
    store = Store(tmp_path)
    store.record_item("pair-1", "pending", identity="a.mp4", lip_ref="b.mp4")
    store.record_item("pair-1", "running")
    store.record_item("pair-1", "failed", error="no face found in b.mp4")
    store.record_item("pair-2", "done", output="o.mp4")
    items = {r["item_id"]: r for r in store.items()}
    assert items["pair-1"]["status"] == "failed"
    assert items["pair-1"]["identity"] == "a.mp4"
    assert items["pair-1"]["error"] == "no face found in b.mp4"
    assert items["pair-2"]["status"] == "done"
    # the table is a real Parquet dataset readable by pyarrow alone
    table = ds.dataset(tmp_path / "metadata" / "items", format="parquet").to_table()
    assert table.num_rows == 4


def test_running_after_failure_clears_error(tmp_path):
    store = Store(tmp_path)
    store.record_item("x", "failed", error="boom")
    store.record_item("x", "running")
    assert store.item("x")["error"] is None


def test_fragments_are_atomic_and_ignore_leftover_temporaries(tmp_path):
    store = Store(tmp_path)
    store.record_stage("x", "face_crop", 0, "done", seconds=1.0, frames=3, cache_key="k")
    folder = tmp_path / "metadata" / "stages"
    # a writer killed mid-write leaves only a dot-prefixed temporary, which readers skip
    (folder / ".123-killed.parquet.tmp").write_bytes(b"PAR1 half written")
    assert store.done_chunks("x", "face_crop", "k") == {0}
    assert all(name.startswith("part-") or name.startswith(".") for name in os.listdir(folder))


def test_done_chunks_need_matching_key_and_latest_status(tmp_path):
    store = Store(tmp_path)
    store.record_stage("x", "diffusion", 0, "done", seconds=1, frames=4, cache_key="old")
    store.record_stage("x", "diffusion", 1, "done", seconds=1, frames=4, cache_key="new")
    store.record_stage("x", "diffusion", 2, "done", seconds=1, frames=4, cache_key="new")
    store.record_stage("x", "diffusion", 2, "failed", seconds=1, frames=4, cache_key="new", error="e")
    assert store.done_chunks("x", "diffusion", "new") == {1}


def test_arrays_live_in_item_stage_groups(tmp_path):
    store = Store(tmp_path)
    a = store.open_array("x", "face_crop", "identity_crops", (10, 8, 8, 3), np.uint8, chunk_frames=4)
    a[4:8] = 7
    again = store.open_array("x", "face_crop", "identity_crops", (10, 8, 8, 3), np.uint8, chunk_frames=4)
    assert again[5].max() == 7  # resuming keeps finished chunks
    assert (tmp_path / "items" / "x.zarr" / "face_crop" / "identity_crops").is_dir()
    store.set_attrs("x", "face_crop", n_frames=10)
    assert store.attrs("x", "face_crop")["n_frames"] == 10
    assert store.has_stage_group("x", "face_crop")
    with pytest.raises(ValueError, match="unknown stage"):
        store.stage_group("x", "not_a_stage")
    assert len(STAGES) == 8


def test_metrics_latest_value(tmp_path):
    store = Store(tmp_path)
    store.record_metrics("x", {"MNP": 0.5})
    store.record_metrics("x", {"MNP": 0.25, "PD": 0.01})
    assert store.metrics("x") == {"x": {"MNP": 0.25, "PD": 0.01}}


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "x" * 200])
def test_item_ids_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises(ValueError, match="item_id"):
        Store(tmp_path).item_path(bad)
