"""Store layout (ARCHITECTURE.md, "The store"):

    STORE/
      items/<item_id>.zarr/<stage>/...   one Zarr group per item, one subgroup per stage
                                         (its arrays and attributes: `storage.arrays`)
      metadata/items/bucket=XX/*.parquet    one row per status change of an item
      metadata/stages/bucket=XX/*.parquet   one row per (item_id, stage, chunk) computed
      metadata/metrics/bucket=XX/*.parquet  item_id, metric, value
      runs/<run_id>.json                 host, pid, start, heartbeat and end of each run
      outputs/<item_id>.mp4

The metadata tables are append-only Parquet datasets (`storage.tables`): the current state of
a key is its latest row. An item recorded `running` whose run ended, stopped beating or whose
process is gone reads as `interrupted`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import socket
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.arrays import STAGE_ATTRS, STAGES, ArraySpec, check_stage
from storage.tables import Table, integer_codes, latest_positions, latest_rows, pid_alive

if TYPE_CHECKING:  # zarr is imported where arrays are opened: `freetalk status` never needs it
    import zarr

ITEM_STATUSES = ("pending", "running", "interrupted", "done", "failed")
HEARTBEAT_SECONDS = 5.0     # how often a live run rewrites its heartbeat
STALE_AFTER_SECONDS = 60.0  # a run whose heartbeat is older than this is taken as dead

_TS = pa.timestamp("us", tz="UTC")


def _text(*names: str) -> list[tuple[str, pa.DataType]]:
    return [(name, pa.string()) for name in names]


ITEM_SCHEMA = pa.schema([
    *_text("item_id", "identity", "lip_ref", "audio", "identity_sha256", "lip_ref_sha256", "audio_sha256"),
    ("n_frames", pa.int64()), ("fps", pa.float64()),
    *_text("status", "error", "output", "output_sha256", "watermark_id"),
    ("updated_at", _TS), ("run_id", pa.string()), ("started_at", _TS),
    ("output_key", pa.string()),  # the key of the output's last stage: what made it
])
STAGE_SCHEMA = pa.schema([
    *_text("item_id", "stage"), ("chunk", pa.int64()), ("status", pa.string()), ("seconds", pa.float64()),
    ("frames", pa.int64()), *_text("cache_key", "error"), ("finished_at", _TS),
])
METRIC_SCHEMA = pa.schema([*_text("item_id", "metric"), ("value", pa.float64()), ("updated_at", _TS)])
_TABLES = {  # schema, key, time column
    "items": (ITEM_SCHEMA, ["item_id"], "updated_at"),
    "stages": (STAGE_SCHEMA, ["item_id", "stage", "chunk"], "finished_at"),
    "metrics": (METRIC_SCHEMA, ["item_id", "metric"], "updated_at"),
}
_ACTIVE_RUNS: dict[Path, "_Heartbeat"] = {}   # store root -> the run() this process is in
_PROCESS_RUNS: dict[Path, "_Heartbeat"] = {}  # store root -> this process's run outside run()
_RUNS_LOCK = threading.Lock()
_ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Store:
    """A store rooted at a local directory (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self._tables = {name: Table(self.root / "metadata" / name, schema, keys, order)
                        for name, (schema, keys, order) in _TABLES.items()}

    # ----------------------------------------------------------------- paths
    def item_path(self, item_id: str) -> Path:
        check_item_id(item_id)
        return self.root / "items" / f"{item_id}.zarr"

    def output_path(self, item_id: str) -> Path:
        check_item_id(item_id)
        return self.root / "outputs" / f"{item_id}.mp4"

    def partial_output_path(self, item_id: str) -> Path:
        """Where an item's output is written before it is renamed to `output_path` (same
        folder, hidden name; a rerun overwrites what a killed run left)."""
        check_item_id(item_id)
        return self.root / "outputs" / f".{item_id}.partial.mp4"

    def report_dir(self, item_id: str) -> Path:
        """Folder for an item's human-readable artefacts (previews, plots)."""
        check_item_id(item_id)
        return self.root / "reports" / item_id

    def log_path(self, name: str) -> Path:
        """Log file of failures: `logs/<item_id>.log` for an item, `logs/generate.log` for a
        `generate` that failed before its item was known. Each failure appends its traceback."""
        check_item_id(name)
        return self.root / "logs" / f"{name}.log"

    def log_failure(self, name: str, exc: BaseException, context: str = "") -> Path:
        """Append the time, `context` (e.g. the command line) and `exc`'s full traceback to
        `log_path(name)`; returns that path."""
        import traceback

        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(exc))
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"=== {_now().isoformat(timespec='seconds')} {context}".rstrip() + "\n" + text + "\n")
        return path

    @property
    def prefect_results(self) -> Path:
        """Where Prefect persists task results and cache keys for this store."""
        return self.root / ".prefect" / "results"

    # ------------------------------------------------------------------ zarr
    def item_group(self, item_id: str, mode: str = "r") -> zarr.Group:
        """The Zarr group of one item (every stage's arrays)."""
        import zarr

        return zarr.open_group(self.item_path(item_id), mode=mode)

    def stage_group(self, item_id: str, stage: str, *, reset: bool = False) -> zarr.Group:
        """The Zarr group of one stage of one item; `reset` empties it first."""
        check_stage(stage)
        root = self.item_group(item_id, mode="a")
        if reset and stage in root:
            del root[stage]
        return root.require_group(stage)

    def has_stage_group(self, item_id: str, stage: str) -> bool:
        path = self.item_path(item_id)
        return (path / check_stage(stage) / "zarr.json").exists()

    def has_array(self, item_id: str, spec: ArraySpec) -> bool:
        """The item holds the array of `spec`."""
        return (self.item_path(item_id) / spec.stage / spec.name / "zarr.json").exists()

    def create_array(self, item_id: str, spec: ArraySpec, shape: tuple[int, ...],
                     chunk_frames: int | None = None) -> zarr.Array:
        """An empty array of the catalogue's `spec` (`storage.arrays`), replacing any old one:
        `shape` checked against the declared one, the declared dtype and chunking (`chunk_frames`
        for arrays chunked by frames), compressed with the codec `array_compressors` picks."""
        shape = spec.check_shape(shape)
        chunks, shards = spec.chunks(shape, chunk_frames)
        group = self.stage_group(item_id, spec.stage)
        return group.create_array(spec.name, shape=shape, dtype=spec.dtype, chunks=chunks or "auto",
                                  shards=shards, overwrite=True, fill_value=0,
                                  compressors=array_compressors(spec.dtype))

    def open_array(self, item_id: str, spec: ArraySpec, shape: tuple[int, ...],
                   chunk_frames: int | None = None) -> zarr.Array:
        """Like `create_array`, but keeps an existing array of the same shape and dtype, so a
        stage that resumes keeps its finished chunks."""
        group = self.stage_group(item_id, spec.stage)
        if spec.name in group:
            array = group[spec.name]
            if tuple(array.shape) == tuple(shape) and np.dtype(array.dtype) == spec.dtype:
                return array
        return self.create_array(item_id, spec, shape, chunk_frames)

    def drop_intermediates(self, item_id: str) -> None:
        """Delete every stage array of an item (`keep="final"`): its output, report, stage
        rows and metrics stay. Its stages then count as not done (`has_stage_group`)."""
        path = self.item_path(item_id)
        if path.exists():
            import shutil

            shutil.rmtree(path)

    def write_array(self, item_id: str, spec: ArraySpec, data: np.ndarray,
                    chunk_frames: int | None = None) -> zarr.Array:
        """`data` (of the declared dtype: nothing is cast) as the array of `spec`."""
        data = np.asarray(data)
        if data.dtype != spec.dtype:
            raise TypeError(f"{spec.path} is {spec.dtype}, got {data.dtype}")
        array = self.create_array(item_id, spec, data.shape, chunk_frames)
        array[...] = data
        return array

    def array(self, item_id: str, spec: ArraySpec) -> zarr.Array:
        """An existing array (lazy; index it to read)."""
        return self.item_group(item_id)[spec.path]

    def read(self, item_id: str, spec: ArraySpec) -> np.ndarray:
        return self.array(item_id, spec)[...]

    def set_attrs(self, item_id: str, stage: str, **attrs: Any) -> None:
        """Set attributes of a stage's group; only those `storage.arrays.STAGE_ATTRS` declares."""
        unknown = sorted(set(attrs) - set(STAGE_ATTRS[check_stage(stage)]))
        if unknown:
            raise ValueError(f"{stage} declares no attribute {', '.join(unknown)}")
        self.stage_group(item_id, stage).attrs.update(attrs)

    def attrs(self, item_id: str, stage: str) -> dict[str, Any]:
        return dict(self.item_group(item_id)[check_stage(stage)].attrs)

    # --------------------------------------------------------------- tables
    def _read(self, table: str) -> pa.Table:
        """Every row ever appended to a table (history included)."""
        return self._tables[table].read_all()

    def table(self, name: str) -> pa.Table:
        """Current state of a table: the latest row per key; items with their derived status."""
        latest = self._tables[name].latest_all()
        if name == "items":
            latest = self._derive_status(latest)
        return latest

    def record_item(self, item_id: str, status: str, **fields: Any) -> None:
        """Append a row for an item; fields not given keep their last recorded value. A
        `running` row gets the id of the run this process is in unless `run_id` is given."""
        if status not in ITEM_STATUSES:
            raise ValueError(f"status must be one of {ITEM_STATUSES}, got {status!r}")
        check_item_id(item_id)
        self._record_item(item_id, status, fields)

    def record_failure(self, item_id: str, reason: Any, **fields: Any) -> None:
        """Record any item id (one that `check_item_id` rejects included) as failed with a
        one-line reason. Meant for failure paths: it checks nothing that could raise."""
        text = (" ".join(str(reason).split()) or "failed")[:1000]
        try:
            self._record_item(str(item_id), "failed", {**_as_item_fields(fields), "error": text})
        except (pa.ArrowException, TypeError, ValueError, OverflowError):  # a field of the wrong type
            self._tables["items"].append([{"item_id": str(item_id), "status": "failed", "error": text,
                                           "updated_at": _now()}])

    def _record_item(self, item_id: str, status: str, fields: dict[str, Any]) -> None:
        previous = self._latest_item_row(item_id) or {}
        now = _now()
        row = {**previous, **fields, "item_id": item_id, "status": status, "updated_at": now}
        if status != "failed" and "error" not in fields:
            row["error"] = None
        if status == "running":
            if "run_id" not in fields:
                row["run_id"] = self._current_run_id()
            if "started_at" not in fields and (previous.get("status") != "running"
                                               or previous.get("run_id") != row["run_id"]):
                row["started_at"] = now
        self._tables["items"].append([row])

    def register_items(self, rows: list[dict[str, Any]]) -> list[str]:
        """Record as `pending`, in one append, the items of `rows` (dicts with `item_id` and any
        item fields) the store does not know yet; known items are left as they are. Returns
        the ids registered."""
        known = set(self._tables["items"].read_all(["item_id"])["item_id"].to_pylist())
        now = _now()
        new: dict[str, dict[str, Any]] = {}
        for row in rows:
            item_id = str(row["item_id"])
            if item_id not in known and item_id not in new:
                new[item_id] = {**_as_item_fields(row), "item_id": item_id, "status": "pending",
                                "error": None, "updated_at": now, "run_id": None, "started_at": None}
        self._tables["items"].append(list(new.values()))
        return list(new)

    def record_stage(self, item_id: str, stage: str, chunk: int, status: str, *,
                     seconds: float, frames: int, cache_key: str, error: str | None = None) -> None:
        self._tables["stages"].append([{
            "item_id": item_id, "stage": stage, "chunk": int(chunk), "status": status,
            "seconds": float(seconds), "frames": int(frames), "cache_key": cache_key,
            "error": error, "finished_at": _now(),
        }])

    def record_metrics(self, item_id: str, metrics: dict[str, float]) -> None:
        now = _now()
        self._tables["metrics"].append([{"item_id": item_id, "metric": k, "value": float(v),
                                         "updated_at": now} for k, v in metrics.items()])

    def _latest_item_row(self, item_id: str) -> dict[str, Any] | None:
        rows = self._tables["items"].latest_item(item_id).to_pylist()
        return rows[0] if rows else None

    def items(self) -> list[dict[str, Any]]:
        """Current row of every item, ordered by item_id."""
        return self.table("items").sort_by("item_id").to_pylist()

    def item(self, item_id: str) -> dict[str, Any] | None:
        latest = self._tables["items"].latest_item(item_id)
        rows = self._derive_status(latest).to_pylist()
        return rows[0] if rows else None

    def stage_rows(self, item_id: str | None = None) -> list[dict[str, Any]]:
        """Latest row per (item_id, stage, chunk)."""
        table = self._tables["stages"]
        latest = table.latest_all() if item_id is None else table.latest_item(item_id)
        rows = latest.to_pylist()
        return sorted(rows, key=lambda r: (r["item_id"], STAGES.index(r["stage"])
                                           if r["stage"] in STAGES else 99, r["chunk"]))

    def done_chunks(self, item_id: str, stage: str, cache_key: str) -> set[int]:
        """Chunks of a stage recorded done under this cache key (the only proof a Zarr chunk
        is complete). Reads only this item's bucket."""
        rows = self._tables["stages"].read_item(item_id).filter(pc.field("stage") == stage)
        latest = latest_rows(rows, ["chunk"], "finished_at")
        done = latest.filter((pc.field("status") == "done") & (pc.field("cache_key") == cache_key))
        return set(done["chunk"].to_pylist())

    def metrics(self, item_id: str | None = None) -> dict[str, dict[str, float]]:
        table = self._tables["metrics"]
        latest = table.latest_all() if item_id is None else table.latest_item(item_id)
        out: dict[str, dict[str, float]] = {}
        for row in latest.to_pylist():
            out.setdefault(row["item_id"], {})[row["metric"]] = row["value"]
        return out

    # ----------------------------------------------------------------- runs
    @contextmanager
    def run(self, kind: str = "generate") -> Iterator[str]:
        """A run of this process on this store: recorded in `runs/<run_id>.json` with host, pid
        and start, its heartbeat rewritten every HEARTBEAT_SECONDS by a daemon thread, marked
        ended on exit. Yields the run id; `running` rows this process records meanwhile carry
        it unless they name another."""
        beat = _Heartbeat(self, kind)
        outer = _ACTIVE_RUNS.get(self.root)
        _ACTIVE_RUNS[self.root] = beat
        outcome = "error"
        try:
            yield beat.run_id
            outcome = "ok"
        finally:
            if outer is None:
                _ACTIVE_RUNS.pop(self.root, None)
                self.compact()
            else:
                _ACTIVE_RUNS[self.root] = outer
            beat.end(outcome)

    def compact(self) -> None:
        """Merge each table bucket of three files or more into one segment (at the end of every
        outermost `run`): readers of the whole store then open at most two files per bucket, not
        the twenty a long run can leave. Buckets another writer is merging are left as they are."""
        for table in self._tables.values():
            if table.folder.is_dir():
                for entry in os.scandir(table.folder):
                    if entry.is_dir() and entry.name.startswith("bucket=") and len(os.listdir(entry.path)) >= 3:
                        table.compact(entry.name, full=True)

    def _current_run_id(self) -> str:
        """The run this process is in; outside `run()`, one run per process and store that
        lasts as long as the process."""
        beat = _ACTIVE_RUNS.get(self.root)
        if beat is None or beat.pid != os.getpid():  # none yet, or inherited through fork
            with _RUNS_LOCK:
                beat = _PROCESS_RUNS.get(self.root)
                if beat is None or beat.pid != os.getpid():
                    beat = _PROCESS_RUNS[self.root] = _Heartbeat(self, "process")
                    atexit.register(beat.end, "exit")
        return beat.run_id

    def run_info(self, run_id: str) -> dict[str, Any] | None:
        """The record of a run (`runs/<run_id>.json`), or None."""
        try:
            return json.loads((self.root / "runs" / f"{run_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_run(self, record: dict[str, Any], create: bool = True) -> None:
        folder = self.root / "runs"
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{record['run_id']}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"{record['run_id']}.json")

    def run_is_live(self, run_id: str | None) -> bool:
        """A run counts as live while it has not ended, its heartbeat is younger than
        STALE_AFTER_SECONDS and, on this host, its process exists."""
        info = self.run_info(run_id) if run_id else None
        if info is None or info.get("ended_at"):
            return False
        age = (_now() - datetime.fromisoformat(info["heartbeat"])).total_seconds()
        if age > STALE_AFTER_SECONDS:
            return False
        return info.get("host") != socket.gethostname() or pid_alive(int(info.get("pid", 0)))

    def _derive_status(self, items: pa.Table) -> pa.Table:
        """Items stored `running` whose run is not live read as `interrupted`."""
        running = pc.equal(items["status"], "running")
        if not pc.any(running).as_py():
            return items
        run_ids = set(items.filter(running)["run_id"].to_pylist())
        dead = [r for r in run_ids if not self.run_is_live(r)]
        if not dead:
            return items
        value_set = pa.array([r for r in dead if r is not None], pa.string())
        stale = pc.and_(running, pc.fill_null(pc.is_in(items["run_id"], value_set=value_set), False))
        if None in dead:
            stale = pc.or_(stale, pc.and_(running, pc.is_null(items["run_id"])))
        status = pc.if_else(stale, pa.scalar("interrupted"), items["status"])
        return items.set_column(items.schema.get_field_index("status"), "status", status)

    # --------------------------------------------------------------- status
    def status(self) -> list[dict[str, Any]]:
        """One record per item: item_id, state, stages_done (stages whose every recorded chunk
        is done), stages_total, seconds (of done chunks), error, output, run_id. The stage
        counts come from integer codes and numpy sums over the latest stage rows, so this stays
        fast at millions of rows."""
        items = self.table("items").sort_by("item_id")
        if items.num_rows == 0:
            return []
        columns = ["item_id", "stage", "chunk", "finished_at", "status", "seconds"]
        stages = self._tables["stages"].read_all(columns, dictionary=True)
        per_item: dict[str, tuple[int, float]] = {}
        if stages.num_rows:
            item_codes, n_items, item_names = integer_codes(stages["item_id"])
            stage_codes, n_stages, _ = integer_codes(stages["stage"])
            chunk_codes, n_chunks, _ = integer_codes(stages["chunk"])
            latest = latest_positions(stages, ["item_id", "stage", "chunk"], "finished_at",
                                      codes=[(item_codes, n_items), (stage_codes, n_stages),
                                             (chunk_codes, n_chunks)])
            if latest is None:
                latest = np.arange(stages.num_rows)  # not reached below 2**62 distinct keys
            status_codes, _, status_names = integer_codes(stages["status"])
            done_code = status_names.index("done") + 1 if "done" in status_names else -1
            done = status_codes[latest] == done_code
            seconds = pc.fill_null(stages["seconds"], 0.0).to_numpy(zero_copy_only=False)[latest]
            group = item_codes[latest] * n_stages + stage_codes[latest]  # one (item, stage)
            size = n_items * n_stages
            chunks = np.bincount(group, minlength=size)
            chunks_done = np.bincount(group, weights=done, minlength=size)
            complete = (chunks > 0) & (chunks_done == chunks)
            stages_done = complete.reshape(n_items, n_stages).sum(axis=1)
            item_seconds = np.bincount(item_codes[latest], weights=np.where(done, seconds, 0.0),
                                       minlength=n_items)
            per_item = {name: (int(stages_done[code + 1]), float(item_seconds[code + 1]))
                        for code, name in enumerate(item_names)}
        out = []
        columns = items.select(["item_id", "status", "error", "output", "run_id"]).to_pydict()
        for i, item_id in enumerate(columns["item_id"]):
            n_done, secs = per_item.get(item_id, (0, 0.0))
            out.append({
                "item_id": item_id, "state": columns["status"][i],
                "stages_done": n_done, "stages_total": len(STAGES), "seconds": round(secs, 3),
                "error": columns["error"][i], "output": columns["output"][i], "run_id": columns["run_id"][i],
            })
        return out


def _as_item_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Item fields with text columns as text (paths, numbers from a manifest)."""
    out = {}
    for name, value in fields.items():
        if name in ITEM_SCHEMA.names and value is not None:
            if pa.types.is_string(ITEM_SCHEMA.field(name).type):
                value = str(value)
        out[name] = value
    return out


class _Heartbeat:
    """The record of one run, kept fresh by a daemon thread until `end`."""

    def __init__(self, store: Store, kind: str):
        self.store = store
        self.pid = os.getpid()
        self.run_id = f"{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:10]}"
        self.record = {"run_id": self.run_id, "kind": kind, "host": socket.gethostname(), "pid": self.pid,
                       "started_at": _now().isoformat(), "heartbeat": _now().isoformat(),
                       "ended_at": None, "outcome": None}
        store._write_run(self.record)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.store._write_run({**self.record, "heartbeat": _now().isoformat()}, create=False)
            except OSError:  # the store is gone or unwritable for a moment: try again next beat
                pass

    def end(self, outcome: str) -> None:
        if self._stop.is_set() or self.pid != os.getpid():
            return
        self._stop.set()
        self._thread.join()
        now = _now().isoformat()
        try:
            self.store._write_run({**self.record, "heartbeat": now, "ended_at": now, "outcome": outcome},
                                  create=False)
        except OSError:
            pass  # the store is gone; a reader then finds the process dead or the heartbeat stale


def array_compressors(dtype: np.dtype) -> tuple:
    """Codec of every stage array: Blosc zstd level 3 without shuffle. Measured on the 5 s
    sample pair (bench/store_scale.py `size`, kB per output frame): crops 551 (zstd 0: 562,
    bitshuffle: 493 but 3-4x slower to read, lz4: 654), int16 flows 34 (shuffle: 36, lz4: 94),
    uint8 masks 17, float16 embeddings 15 (shuffle and bitshuffle within 1%); zstd 7 saves
    at most 10% at 5x the write time."""
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),)


def check_item_id(item_id: str) -> str:
    if not _ITEM_ID.match(item_id or ""):
        raise ValueError(f"item_id {item_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return item_id
