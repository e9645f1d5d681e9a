"""Store layout (ARCHITECTURE.md, "The store"):

    STORE/
      items/<item_id>.zarr/<stage>/...   one Zarr group per item, one subgroup per stage
      metadata/items/                    Parquet dataset, one fragment per status change
      metadata/stages/                   Parquet dataset, one row per (item_id, stage, chunk) computed
      metadata/metrics/                  Parquet dataset: item_id, metric, value
      outputs/<item_id>.mp4

Every Parquet fragment is written under a dot-prefixed temporary name (which
`pyarrow.dataset` ignores) and renamed into place, so a killed writer never leaves a
half-written fragment and concurrent writers never touch the same file. Tables are
append-only; the current state of a row is its latest fragment.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import zarr

STAGES = (
    "face_crop",
    "fit_3dmm",
    "structure_render",
    "clip_embed",
    "controller",
    "diffusion",
    "optical_flow",
    "noise_filter",
)
ITEM_STATUSES = ("pending", "running", "done", "failed")

_TS = pa.timestamp("us", tz="UTC")
ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("identity", pa.string()),
    ("lip_ref", pa.string()),
    ("audio", pa.string()),
    ("identity_sha256", pa.string()),
    ("lip_ref_sha256", pa.string()),
    ("audio_sha256", pa.string()),
    ("n_frames", pa.int64()),
    ("fps", pa.float64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("output", pa.string()),
    ("output_sha256", pa.string()),
    ("watermark_id", pa.string()),
    ("updated_at", _TS),
])
STAGE_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("stage", pa.string()),
    ("chunk", pa.int64()),
    ("status", pa.string()),
    ("seconds", pa.float64()),
    ("frames", pa.int64()),
    ("cache_key", pa.string()),
    ("error", pa.string()),
    ("finished_at", _TS),
])
METRIC_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("updated_at", _TS),
])
_TABLES = {"items": ITEM_SCHEMA, "stages": STAGE_SCHEMA, "metrics": METRIC_SCHEMA}
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

    # ----------------------------------------------------------------- paths
    def item_path(self, item_id: str) -> Path:
        check_item_id(item_id)
        return self.root / "items" / f"{item_id}.zarr"

    def output_path(self, item_id: str) -> Path:
        check_item_id(item_id)
        return self.root / "outputs" / f"{item_id}.mp4"

    def report_dir(self, item_id: str) -> Path:
        """Folder for an item's human-readable artefacts (previews, plots)."""
        check_item_id(item_id)
        return self.root / "reports" / item_id

    @property
    def prefect_results(self) -> Path:
        """Where Prefect persists task results and cache keys for this store."""
        return self.root / ".prefect" / "results"

    # ------------------------------------------------------------------ zarr
    def stage_group(self, item_id: str, stage: str, *, reset: bool = False) -> zarr.Group:
        """The Zarr group of one stage of one item; `reset` empties it first."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        root = zarr.open_group(self.item_path(item_id), mode="a")
        if reset and stage in root:
            del root[stage]
        return root.require_group(stage)

    def has_stage_group(self, item_id: str, stage: str) -> bool:
        path = self.item_path(item_id)
        return (path / stage / "zarr.json").exists()

    def create_array(self, item_id: str, stage: str, name: str, shape: tuple[int, ...],
                     dtype: Any, chunk_frames: int | None = None, tile: int | None = None) -> zarr.Array:
        """An empty array chunked along the first (frame) axis, replacing any old one,
        compressed with the codec `array_compressors` picks for its dtype.

        `tile` (for `(T, H, W, ...)` frames that hold data in part of the frame only, zero
        elsewhere): each chunk of frames is one file (a Zarr shard) of `tile x tile` pieces,
        and pieces that are all zero are not stored at all."""
        group = self.stage_group(item_id, stage)
        chunks, shards = None, None
        if chunk_frames is not None and len(shape) > 0:
            chunks = (max(1, min(chunk_frames, shape[0])),) + tuple(shape[1:])
            if tile is not None and len(shape) >= 3:
                shards = chunks
                chunks = (chunks[0], min(tile, shape[1]), min(tile, shape[2])) + tuple(shape[3:])
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks or "auto",
                                  shards=shards, overwrite=True, fill_value=0,
                                  compressors=array_compressors(np.dtype(dtype)))

    def open_array(self, item_id: str, stage: str, name: str, shape: tuple[int, ...],
                   dtype: Any, chunk_frames: int | None = None, tile: int | None = None) -> zarr.Array:
        """Like `create_array`, but keeps an existing array of the same shape and dtype, so a
        stage that resumes keeps its finished chunks."""
        group = self.stage_group(item_id, stage)
        if name in group:
            array = group[name]
            if tuple(array.shape) == tuple(shape) and np.dtype(array.dtype) == np.dtype(dtype):
                return array
        return self.create_array(item_id, stage, name, shape, dtype, chunk_frames, tile)

    def drop_intermediates(self, item_id: str) -> None:
        """Delete every stage array of an item (`keep="final"`): its output, report, stage
        rows and metrics stay. Its stages then count as not done (`has_stage_group`)."""
        path = self.item_path(item_id)
        if path.exists():
            import shutil

            shutil.rmtree(path)

    def write_array(self, item_id: str, stage: str, name: str, data: np.ndarray,
                    chunk_frames: int | None = None) -> zarr.Array:
        data = np.asarray(data)
        array = self.create_array(item_id, stage, name, data.shape, data.dtype, chunk_frames)
        array[...] = data
        return array

    def array(self, item_id: str, stage: str, name: str) -> zarr.Array:
        """An existing array (lazy; index it to read)."""
        return zarr.open_group(self.item_path(item_id), mode="r")[f"{stage}/{name}"]

    def read(self, item_id: str, stage: str, name: str) -> np.ndarray:
        return self.array(item_id, stage, name)[...]

    def set_attrs(self, item_id: str, stage: str, **attrs: Any) -> None:
        self.stage_group(item_id, stage).attrs.update(attrs)

    def attrs(self, item_id: str, stage: str) -> dict[str, Any]:
        group = zarr.open_group(self.item_path(item_id), mode="r")
        return dict(group[stage].attrs)

    # --------------------------------------------------------------- parquet
    def _append(self, table: str, rows: list[dict[str, Any]]) -> Path:
        schema = _TABLES[table]
        folder = self.root / "metadata" / table
        folder.mkdir(parents=True, exist_ok=True)
        data = pa.Table.from_pylist(
            [{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
        stem = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = folder / f".{stem}.parquet.tmp"
        pq.write_table(data, tmp)
        final = folder / f"part-{stem}.parquet"
        os.replace(tmp, final)
        return final

    def _read(self, table: str) -> pa.Table:
        folder = self.root / "metadata" / table
        schema = _TABLES[table]
        if not folder.is_dir():
            return schema.empty_table()
        dataset = ds.dataset(folder, format="parquet", schema=schema,
                             ignore_prefixes=[".", "_"])
        return dataset.to_table()

    def _latest(self, table: str, keys: list[str], order: str) -> list[dict[str, Any]]:
        rows = self._read(table).to_pylist()
        latest: dict[tuple, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: r[order]):
            latest[tuple(row[k] for k in keys)] = row
        return list(latest.values())

    def record_item(self, item_id: str, status: str, **fields: Any) -> None:
        """Append a row for an item; fields not given keep their last recorded value."""
        if status not in ITEM_STATUSES:
            raise ValueError(f"status must be one of {ITEM_STATUSES}, got {status!r}")
        check_item_id(item_id)
        previous = self.item(item_id) or {}
        row = {**previous, **fields, "item_id": item_id, "status": status, "updated_at": _now()}
        if status != "failed" and "error" not in fields:
            row["error"] = None
        self._append("items", [row])

    def record_stage(self, item_id: str, stage: str, chunk: int, status: str, *,
                     seconds: float, frames: int, cache_key: str, error: str | None = None) -> None:
        self._append("stages", [{
            "item_id": item_id, "stage": stage, "chunk": int(chunk), "status": status,
            "seconds": float(seconds), "frames": int(frames), "cache_key": cache_key,
            "error": error, "finished_at": _now(),
        }])

    def record_metrics(self, item_id: str, metrics: dict[str, float]) -> None:
        now = _now()
        self._append("metrics", [{"item_id": item_id, "metric": k, "value": float(v),
                                  "updated_at": now} for k, v in metrics.items()])

    def items(self) -> list[dict[str, Any]]:
        """Current row of every item, ordered by item_id."""
        return sorted(self._latest("items", ["item_id"], "updated_at"), key=lambda r: r["item_id"])

    def item(self, item_id: str) -> dict[str, Any] | None:
        for row in self._latest("items", ["item_id"], "updated_at"):
            if row["item_id"] == item_id:
                return row
        return None

    def stage_rows(self, item_id: str | None = None) -> list[dict[str, Any]]:
        """Latest row per (item_id, stage, chunk)."""
        rows = self._latest("stages", ["item_id", "stage", "chunk"], "finished_at")
        if item_id is not None:
            rows = [r for r in rows if r["item_id"] == item_id]
        return sorted(rows, key=lambda r: (r["item_id"], STAGES.index(r["stage"])
                                           if r["stage"] in STAGES else 99, r["chunk"]))

    def done_chunks(self, item_id: str, stage: str, cache_key: str) -> set[int]:
        """Chunks of a stage recorded done under this cache key (the only proof a Zarr chunk
        is complete)."""
        return {r["chunk"] for r in self.stage_rows(item_id)
                if r["stage"] == stage and r["status"] == "done" and r["cache_key"] == cache_key}

    def metrics(self, item_id: str | None = None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for row in self._latest("metrics", ["item_id", "metric"], "updated_at"):
            if item_id is None or row["item_id"] == item_id:
                out.setdefault(row["item_id"], {})[row["metric"]] = row["value"]
        return out


def array_compressors(dtype: np.dtype) -> tuple:
    """Codec of a stage array, chosen by measurement on a sample pair (bench/store_scale.py
    `bench_codecs`): Blosc zstd with byte shuffle for multi-byte data (flows, embeddings,
    landmarks), Blosc zstd without shuffle for bytes (crops, frames, masks)."""
    from zarr.codecs import BloscCodec

    if dtype.itemsize > 1:
        return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),)
    return (BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),)


def check_item_id(item_id: str) -> str:
    if not _ITEM_ID.match(item_id or ""):
        raise ValueError(f"item_id {item_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return item_id
