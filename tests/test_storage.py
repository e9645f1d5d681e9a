import json
import multiprocessing
import os
import signal
import socket
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import storage.store as store_module
import storage.tables as tables
from flows.cli import app
from storage import STAGES, Store, arrays
from storage.store import ITEM_SCHEMA, METRIC_SCHEMA, STAGE_SCHEMA
from storage.tables import COMPACT_AT, MAX_SEGMENTS, bucket_of, latest_rows


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
    bucket = tmp_path / "metadata" / "stages" / bucket_of("x")
    # a writer killed mid-write leaves only a dot-prefixed temporary, which readers skip
    (bucket / ".part-123-killed.parquet.tmp").write_bytes(b"PAR1 half written")
    assert store.done_chunks("x", "face_crop", "k") == {0}
    assert all(name.startswith(("part-", "seg-", ".")) for name in os.listdir(bucket))
    assert os.listdir(tmp_path / "metadata" / "stages") == [bucket_of("x")]


def test_done_chunks_need_matching_key_and_latest_status(tmp_path):
    store = Store(tmp_path)
    store.record_stage("x", "diffusion", 0, "done", seconds=1, frames=4, cache_key="old")
    store.record_stage("x", "diffusion", 1, "done", seconds=1, frames=4, cache_key="new")
    store.record_stage("x", "diffusion", 2, "done", seconds=1, frames=4, cache_key="new")
    store.record_stage("x", "diffusion", 2, "failed", seconds=1, frames=4, cache_key="new", error="e")
    assert store.done_chunks("x", "diffusion", "new") == {1}


def test_arrays_live_in_item_stage_groups(tmp_path):
    store = Store(tmp_path)
    a = store.open_array("x", arrays.MOUTH_MASKS, (10, 8, 8), chunk_frames=4)
    a[4:8] = 7
    again = store.open_array("x", arrays.MOUTH_MASKS, (10, 8, 8), chunk_frames=4)
    assert again[5].max() == 7  # resuming keeps finished chunks
    assert (tmp_path / "items" / "x.zarr" / "face_crop" / "mouth_masks").is_dir()
    store.set_attrs("x", arrays.FACE_CROP, n_frames=10)
    assert store.attrs("x", arrays.FACE_CROP)["n_frames"] == 10
    assert store.has_stage_group("x", arrays.FACE_CROP)
    with pytest.raises(ValueError, match="unknown stage"):
        store.stage_group("x", "not_a_stage")
    assert len(STAGES) == 8


def test_arrays_keep_their_declared_dtype_shape_and_attributes(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(TypeError, match="lip_distance is float32, got float64"):
        store.write_array("x", arrays.LIP_DISTANCE, np.zeros(5))
    with pytest.raises(ValueError, match="does not fit the declared"):
        store.create_array("x", arrays.LANDMARKS["identity"], (5, 67, 2), chunk_frames=4)
    with pytest.raises(ValueError, match="does not fit the declared"):  # crop x crop: one size
        store.create_array("x", arrays.MOUTH_MASKS, (5, 8, 9), chunk_frames=4)
    with pytest.raises(ValueError, match="chunk_frames is needed"):
        store.create_array("x", arrays.MOUTH_MASKS, (5, 8, 8))
    with pytest.raises(ValueError, match="declares no attribute boxes"):
        store.set_attrs("x", arrays.FACE_CROP, boxes=[0, 0, 1, 1])
    tiled = store.create_array("x", arrays.GENERATED_FRAMES, (5, 128, 128, 3), chunk_frames=4)
    assert tiled.shards == (4, 128, 128, 3) and tiled.chunks == (4, arrays.MASK_TILE, arrays.MASK_TILE, 3)


def test_catalogue_keeps_the_fixed_array_names():
    """The names ARCHITECTURE.md fixes, and one stage per group on disk."""
    paths = set(arrays.CATALOGUE)
    for path in ("face_crop/identity_landmarks", "face_crop/lip_ref_landmarks", "face_crop/mouth_masks",
                 "structure_render/frames", "controller/lip_distance", "controller/lambdas",
                 "controller/anchor_index", "diffusion/frames", "noise_filter/noise_pattern",
                 "noise_filter/frames"):
        assert path in paths, path
    assert {spec.stage for spec in arrays.CATALOGUE.values()} == set(arrays.GROUPS) == set(arrays.STAGE_ATTRS)
    assert sum(len(arrays.stage_arrays(group)) for group in arrays.GROUPS) == len(arrays.CATALOGUE)


def test_catalogue_declares_every_fit_field():
    import dataclasses

    from freetalk_core.fit_3dmm import FitResult

    fields = {f.name for f in dataclasses.fields(FitResult)}
    for role in arrays.ROLES:
        assert set(arrays.FIT[role]) == fields
    assert set(arrays.RAW_FIT) == fields - {"size"}


def test_metrics_latest_value(tmp_path):
    store = Store(tmp_path)
    store.record_metrics("x", {"MNP": 0.5})
    store.record_metrics("x", {"MNP": 0.25, "PD": 0.01})
    assert store.metrics("x") == {"x": {"MNP": 0.25, "PD": 0.01}}


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "x" * 200])
def test_item_ids_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises(ValueError, match="item_id"):
        Store(tmp_path).item_path(bad)


def _stage_keys(store):
    raw = store._read("stages")
    return list(zip(raw["item_id"].to_pylist(), raw["stage"].to_pylist(), raw["chunk"].to_pylist()))


def test_buckets_merge_and_keep_every_row_once(tmp_path):
    store = Store(tmp_path)
    for chunk in range(10 * COMPACT_AT):
        store.record_stage("long", "diffusion", chunk, "done", seconds=1, frames=4, cache_key="k")
    store.record_stage("long", "diffusion", 3, "failed", seconds=1, frames=4, cache_key="k", error="e")
    bucket = tmp_path / "metadata" / "stages" / bucket_of("long")
    files = [n for n in os.listdir(bucket) if n.endswith(".parquet")]
    assert len(files) < COMPACT_AT + MAX_SEGMENTS  # merged, not one file per row
    assert any(n.startswith("seg-") for n in files)
    keys = _stage_keys(store)
    assert len(keys) == 10 * COMPACT_AT + 1  # history kept, nothing duplicated
    assert store.done_chunks("long", "diffusion", "k") == set(range(10 * COMPACT_AT)) - {3}
    assert not (bucket / ".merge.lock").exists()


def test_a_run_ends_with_every_bucket_in_one_file(tmp_path):
    store = Store(tmp_path)
    with store.run("dataset"):
        for item in ("a", "b", "c"):
            store.record_item(item, "running")
            for chunk in range(COMPACT_AT + 5):
                store.record_stage(item, "diffusion", chunk, "done", seconds=1, frames=4, cache_key="k")
            store.record_item(item, "done")
        buckets = [tmp_path / "metadata" / "stages" / bucket_of(i) for i in "abc"]
        assert max(len(os.listdir(b)) for b in buckets) >= 3  # fragments and a segment meanwhile
    for bucket in buckets:
        assert [n[:4] for n in os.listdir(bucket)] == ["seg-"], bucket.name
    for table in ("items", "stages"):
        for bucket in (tmp_path / "metadata" / table).iterdir():
            assert len(os.listdir(bucket)) <= 2, (table, bucket.name)
    assert len(_stage_keys(store)) == 3 * (COMPACT_AT + 5)  # every row kept once
    assert [r["state"] for r in store.status()] == ["done"] * 3


def test_a_merge_killed_before_its_deletes_leaves_no_duplicate(tmp_path, monkeypatch):
    store = Store(tmp_path)
    monkeypatch.setattr(tables, "COMPACT_AT", 10**9)  # no merge while writing
    for chunk in range(5):
        store.record_stage("x", "diffusion", chunk, "done", seconds=1, frames=4, cache_key="k")
    # the merger dies right after its segment is in place: nothing it replaced is deleted
    real_unlink = tables._unlink
    monkeypatch.setattr(tables, "_unlink", lambda path: None if str(path).endswith(".parquet") else real_unlink(path))
    assert store._tables["stages"].compact(bucket_of("x"))
    bucket = tmp_path / "metadata" / "stages" / bucket_of("x")
    assert sum(n.startswith("part-") for n in os.listdir(bucket)) == 5
    assert sorted(_stage_keys(store)) == [("x", "diffusion", c) for c in range(5)]
    # the next merge deletes what the segment replaced
    monkeypatch.undo()
    assert store._tables["stages"].compact(bucket_of("x"))
    assert [n for n in os.listdir(bucket) if n.endswith(".parquet")] == [
        n for n in os.listdir(bucket) if n.startswith("seg-")]
    assert sorted(_stage_keys(store)) == [("x", "diffusion", c) for c in range(5)]


def test_latest_rows_matches_a_plain_python_reading():
    rng = np.random.default_rng(1)
    n = 500
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    table = pa.table({
        "item_id": [f"i{v}" for v in rng.integers(0, 7, n)],
        "stage": [STAGES[v] for v in rng.integers(0, 3, n)],
        "chunk": rng.integers(0, 5, n),
        "finished_at": pa.array([base + timedelta(microseconds=int(v)) for v in rng.permutation(n)],
                                pa.timestamp("us", tz="UTC")),
        "value": np.arange(n),
    })
    expected = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["finished_at"]):
        expected[(row["item_id"], row["stage"], row["chunk"])] = row["value"]
    got = latest_rows(table, ["item_id", "stage", "chunk"], "finished_at").to_pylist()
    assert {(r["item_id"], r["stage"], r["chunk"]): r["value"] for r in got} == expected
    assert len(got) == len(expected)


def _append_stage_rows(root, writer, n):
    store = Store(root)
    for chunk in range(n):
        item = "shared" if chunk % 2 else f"own-{writer}"
        store.record_stage(item, "optical_flow", writer * 1000 + chunk, "done", seconds=0.1, frames=2,
                           cache_key=f"w{writer}")


def test_concurrent_writers_lose_and_corrupt_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_stage_rows, args=(str(tmp_path), w, 200)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    store = Store(tmp_path)
    keys = _stage_keys(store)
    assert len(keys) == 800 and len(set(keys)) == 800
    for w in range(4):
        assert store.done_chunks("shared", "optical_flow", f"w{w}") == {w * 1000 + c for c in range(1, 200, 2)}
        assert store.done_chunks(f"own-{w}", "optical_flow", f"w{w}") == {w * 1000 + c for c in range(0, 200, 2)}
    assert not list((tmp_path / "metadata").rglob(".merge.lock"))


def _write_forever(root):
    store = Store(root)
    chunk = 0
    while True:
        store.record_stage(f"item-{chunk % 3}", "controller", chunk, "done", seconds=0.1, frames=1, cache_key="k")
        chunk += 1


def test_a_writer_killed_mid_run_leaves_a_readable_table(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=_write_forever, args=(str(tmp_path),))
    writer.start()
    store = Store(tmp_path)
    # Waits for the rows, however slow the machine; only a writer that died early ends the wait.
    while len(store._read("stages")) < 3 * COMPACT_AT:
        assert writer.is_alive(), "the writer process ended before it was killed"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    keys = _stage_keys(store)
    assert len(keys) >= 3 * COMPACT_AT and len(set(keys)) == len(keys)
    chunks = sorted(k[2] for k in keys)
    assert chunks == list(range(len(chunks)))  # every row written before the kill is there
    # writing goes on, merges included (a lock left by the killed writer is taken over)
    for chunk in range(COMPACT_AT):
        store.record_stage("item-0", "controller", 10**6 + chunk, "done", seconds=0.1, frames=1, cache_key="k")
    for bucket in (tmp_path / "metadata" / "stages").iterdir():
        assert sum(n.startswith("part-") for n in os.listdir(bucket)) < COMPACT_AT
    assert len(_stage_keys(store)) == len(keys) + COMPACT_AT


def test_running_items_of_dead_or_ended_runs_read_interrupted(tmp_path, monkeypatch):
    store = Store(tmp_path)
    with store.run("dataset") as run_id:
        store.record_item("live", "running")
        row = store.item("live")
        assert row["status"] == "running" and row["run_id"] == run_id and row["started_at"] is not None
        assert store.run_info(run_id)["kind"] == "dataset"
        monkeypatch.setattr(store_module, "STALE_AFTER_SECONDS", -1.0)  # every heartbeat is stale
        assert store.item("live")["status"] == "interrupted"
        monkeypatch.setattr(store_module, "STALE_AFTER_SECONDS", 3600.0)
        assert store.item("live")["status"] == "running"
    # the run ended with the item still running
    assert store.item("live")["status"] == "interrupted"
    assert store.run_info(run_id)["ended_at"] is not None
    assert store.run_info(run_id)["outcome"] == "ok"


def test_a_run_whose_heartbeat_stopped_reads_interrupted(tmp_path, monkeypatch):
    store = Store(tmp_path)
    old = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
    store._write_run({"run_id": "r-old", "kind": "dataset", "host": socket.gethostname(),
                      "pid": os.getpid(), "started_at": old, "heartbeat": old, "ended_at": None})
    store.record_item("x", "running", run_id="r-old")
    monkeypatch.setattr(store_module, "STALE_AFTER_SECONDS", 60.0)
    assert store.item("x")["status"] == "interrupted"
    assert [r["status"] for r in store.items()] == ["interrupted"]
    monkeypatch.setattr(store_module, "STALE_AFTER_SECONDS", 3600.0)
    assert store.item("x")["status"] == "running"
    store.record_item("x", "done")
    assert store.item("x")["status"] == "done"


def _run_then_die(root, in_run):
    store = Store(root)
    if in_run:
        with store.run("generate"):
            store.record_item("killed", "running")
            os.kill(os.getpid(), signal.SIGKILL)
    store.record_item("killed", "running")  # outside run(): the process's own run
    assert store.item("killed")["status"] == "running"
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("in_run", [True, False])
def test_a_run_killed_on_this_host_reads_interrupted_at_once(tmp_path, in_run):
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_run_then_die, args=(str(tmp_path), in_run))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    store = Store(tmp_path)
    row = store.item("killed")
    info = store.run_info(row["run_id"])
    assert info["ended_at"] is None and info["pid"] == child.pid  # it never said goodbye
    assert row["status"] == "interrupted"


def test_heartbeat_is_rewritten_while_the_run_lasts(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "HEARTBEAT_SECONDS", 0.01)
    store = Store(tmp_path)
    with store.run() as run_id:
        first = store.run_info(run_id)["heartbeat"]
        deadline = time.monotonic() + 10
        while store.run_info(run_id)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.run_info(run_id)["heartbeat"] != first
    assert not [n for n in os.listdir(tmp_path / "runs") if n.endswith(".tmp")]


def test_register_items_adds_only_unknown_items_in_one_append(tmp_path):
    store = Store(tmp_path)
    store.record_item("item-00003", "done", output="o.mp4")
    before = store.item("item-00003")
    rows = [{"item_id": f"item-{i:05d}", "identity": f"{i}.mp4", "lip_ref": "l.mp4"} for i in range(10_000)]
    new = store.register_items(rows + [{"item_id": "bad id", "identity": "x"}])
    assert len(new) == 10_000 and "item-00003" not in new and "bad id" in new
    items = {r["item_id"]: r for r in store.items()}
    assert len(items) == 10_001
    assert items["item-00003"] == before
    assert items["item-00007"]["status"] == "pending" and items["item-00007"]["identity"] == "7.mp4"
    parts = list((tmp_path / "metadata" / "items").glob("bucket=*/part-*.parquet"))
    assert len(parts) <= tables.BUCKETS + 1  # one fragment per bucket, not one per item
    assert store.register_items(rows) == []


def test_record_failure_takes_any_item_id(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="item_id"):
        store.record_item("a b", "running")
    store.record_failure("a b", "item_id 'a b' is not valid:\n use letters", identity="x.mp4", bogus=1)
    row = store.item("a b")
    assert row["status"] == "failed" and row["identity"] == "x.mp4"
    assert row["error"] == "item_id 'a b' is not valid: use letters"
    store.record_failure("../../etc", ValueError("no"), identity=tmp_path / "p.mp4")
    assert store.item("../../etc")["error"] == "no"
    assert store.item("../../etc")["identity"] == str(tmp_path / "p.mp4")
    store.record_failure(7, "bad manifest row", n_frames="many")  # a field of the wrong type
    assert store.item("7")["status"] == "failed" and store.item("7")["error"] == "bad manifest row"
    assert not (tmp_path / "items").exists()


def _write_old_fragment(folder, schema, row, stem):
    """A fragment as the one-file-per-row layout wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{n: row.get(n) for n in schema.names}], schema=schema)
    pq.write_table(table, folder / f".{stem}.parquet.tmp")
    os.replace(folder / f".{stem}.parquet.tmp", folder / f"part-{stem}.parquet")


def test_a_store_of_the_old_layout_is_migrated(tmp_path):
    old_items = pa.schema([f for f in ITEM_SCHEMA if f.name not in ("run_id", "started_at")])
    meta = tmp_path / "metadata"
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i, status in enumerate(["running", "done"]):
        _write_old_fragment(meta / "items", old_items, {"item_id": "old", "status": status, "identity": "a.mp4",
                                                        "updated_at": t0 + timedelta(seconds=i)},
                            f"{i:020d}-1-aaaa{i}")
    for chunk in range(3):
        _write_old_fragment(meta / "stages", STAGE_SCHEMA,
                            {"item_id": "old", "stage": "diffusion", "chunk": chunk, "status": "done",
                             "seconds": 2.0, "frames": 4, "cache_key": "k", "finished_at": t0},
                            f"{chunk:020d}-1-bbbb{chunk}")
    _write_old_fragment(meta / "metrics", METRIC_SCHEMA,
                        {"item_id": "old", "metric": "MNP", "value": 0.5, "updated_at": t0}, "0-1-cccc")
    (meta / "stages" / ".99-killed.parquet.tmp").write_bytes(b"PAR1 half")

    store = Store(tmp_path)
    row = store.item("old")
    assert row["status"] == "done" and row["identity"] == "a.mp4" and row["run_id"] is None
    assert store.done_chunks("old", "diffusion", "k") == {0, 1, 2}
    assert store.metrics() == {"old": {"MNP": 0.5}}
    for table in ("items", "stages", "metrics"):
        assert all(p.is_dir() and p.name.startswith("bucket=") for p in (meta / table).iterdir())
    assert len(store._read("items")) == 2 and len(store._read("stages")) == 3
    # rewritten with today's columns, so plain Parquet readers see one schema
    assert ds.dataset(meta / "items", format="parquet").to_table().column_names == ITEM_SCHEMA.names
    store.record_item("old", "running")
    assert store.item("old")["identity"] == "a.mp4"


def _status_store(tmp_path):
    store = Store(tmp_path)
    store.register_items([{"item_id": i} for i in ("a-done", "b-failed", "c-pending", "d-crashed")])
    for stage in STAGES:
        for chunk in range(2):
            store.record_stage("a-done", stage, chunk, "done", seconds=0.5, frames=4, cache_key="k")
    store.record_item("a-done", "done", output="/out/a.mp4")
    store.record_stage("b-failed", "face_crop", 0, "done", seconds=1.0, frames=4, cache_key="k")
    store.record_stage("b-failed", "fit_3dmm", 0, "failed", seconds=1.0, frames=4, cache_key="k", error="no fit")
    store.record_item("b-failed", "failed", error="no fit")
    with store.run():
        store.record_item("d-crashed", "running")
        store.record_stage("d-crashed", "face_crop", 0, "done", seconds=3.0, frames=4, cache_key="k")
    return store


def test_status_json_tells_each_items_state(tmp_path):
    _status_store(tmp_path)
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert result.exit_code == 1  # an item failed
    records = {r["item_id"]: r for r in json.loads(result.stdout)}
    assert {k: r["state"] for k, r in records.items()} == {
        "a-done": "done", "b-failed": "failed", "c-pending": "pending", "d-crashed": "interrupted"}
    assert records["a-done"]["stages_done"] == 8 and records["a-done"]["stages_total"] == 8
    assert records["a-done"]["seconds"] == 8.0 and records["a-done"]["output"] == "/out/a.mp4"
    assert records["b-failed"]["stages_done"] == 1 and records["b-failed"]["error"] == "no fit"
    assert records["c-pending"]["stages_done"] == 0 and records["c-pending"]["seconds"] == 0.0
    assert records["d-crashed"]["stages_done"] == 1 and records["d-crashed"]["seconds"] == 3.0


def test_status_table_and_exit_status(tmp_path):
    store = _status_store(tmp_path)
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[-1] == "1 done, 1 failed, 1 interrupted, 1 pending"
    assert any(line.split()[:3] == ["a-done", "done", "8/8"] and line.endswith("/out/a.mp4") for line in lines)
    assert any(line.split()[:3] == ["b-failed", "failed", "1/8"] and line.endswith("no fit") for line in lines)
    store.record_item("b-failed", "done", output="/out/b.mp4")
    assert CliRunner().invoke(app, ["status", str(tmp_path)]).exit_code == 0
    empty = CliRunner().invoke(app, ["status", str(tmp_path / "none"), "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
