"""Append-only Parquet tables whose costs stay flat as they grow.

A table is a folder of hash buckets of an item id (`bucket=00` .. `bucket=3f`, Hive-style, so
pyarrow, DuckDB and Polars read the folder as one dataset). Inside a bucket:

    part-<stem>.parquet   appended fragments (one per write)
    seg-<stem>.parquet    merged fragments; its Parquet metadata lists the files it replaced

Every file is written under a dot-prefixed temporary name (which readers skip) and renamed
into place, so a killed writer never leaves a half-written file and concurrent writers never
touch the same file. Appending writes one small file and lists one bucket: its cost does not
depend on the size of the table. When a bucket holds `COMPACT_AT` fragments, the writer that
noticed merges them into a segment under a lock file (a busy lock means someone else is
merging); once `MAX_SEGMENTS` segments exist they are merged into one. A merge renames its
segment into place before it deletes what it replaced, and readers skip every file a segment
says it replaced, so a merger killed at any point leaves neither a gap nor a duplicate.

Rows are never rewritten: the current state of a key is its latest row (by the table's time
column). Reads of one item touch only its bucket.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

BUCKETS = 64
COMPACT_AT = 16          # fragments in a bucket that trigger a merge
MAX_SEGMENTS = 8         # segments in a bucket that trigger a merge of all of them
LOCK_STALE_SECONDS = 600.0
LAYOUT_VERSION = 2
_INPUTS_KEY = b"freetalk.replaces"
_READ_TRIES = 50


def bucket_of(item_id: str, buckets: int = BUCKETS) -> str:
    return f"bucket={zlib.crc32(str(item_id).encode()) % buckets:02x}"


def _stem() -> str:
    return f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(table: pa.Table, folder: Path, name: str) -> Path:
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp)
    final = folder / name
    os.replace(tmp, final)
    return final


def latest_rows(table: pa.Table, keys: list[str], order: str) -> pa.Table:
    """The latest row (by `order`, ties by position) of every distinct `keys`."""
    if table.num_rows <= 1:
        return table
    positions = latest_positions(table, keys, order)
    if positions is None:
        return _latest_by_sort(table, keys, order)
    return table.take(pa.array(positions))


def latest_positions(table: pa.Table, keys: list[str], order: str,
                     codes: list[np.ndarray] | None = None) -> np.ndarray | None:
    """Positions of the latest row of every distinct `keys`: one stable sort of one integer
    code per row, no Python loop over rows. `codes` are the keys' `integer_codes` when the
    caller has them. None when the keys have too many distinct values for one integer."""
    code = np.zeros(table.num_rows, dtype=np.int64)
    span = 1
    for i, k in enumerate(keys):
        values, size = codes[i] if codes is not None else integer_codes(table[k])[:2]
        if span * size >= 2**62:
            return None
        code = code * size + values
        span *= size
    when = table[order].combine_chunks()
    when = pc.fill_null(when.cast(pa.int64()) if pa.types.is_timestamp(when.type) else when, 0)
    ordering = np.lexsort((when.to_numpy(zero_copy_only=False), code))
    sorted_code = code[ordering]
    last = np.ones(len(ordering), dtype=bool)
    last[:-1] = sorted_code[:-1] != sorted_code[1:]
    return ordering[last]


def integer_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int, list | None]:
    """(codes, number of codes, values of text codes): non-negative integers, equal where the
    values are, 0 for nulls. Integers and times keep their order; text is numbered in order
    of first appearance, and `values[code - 1]` is its text."""
    if pa.types.is_dictionary(column.type):  # chunks of one dictionary (`read_all(dictionary=True)`)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        if not chunks:
            return np.zeros(0, dtype=np.int64), 1, []
        indices = np.concatenate([pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
                                  for c in chunks]) + 1
        dictionary = chunks[0].dictionary
        return indices, len(dictionary) + 1, dictionary.to_pylist()
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_integer(array.type) or pa.types.is_timestamp(array.type):
        if pa.types.is_timestamp(array.type):
            array = array.cast(pa.int64())
        if len(array) == 0:
            return np.zeros(0, dtype=np.int64), 1, None
        values = pc.fill_null(array, pc.min(array)).to_numpy(zero_copy_only=False)
        shifted = values.astype(np.int64, copy=False) - values.min() + 1
        if array.null_count:
            shifted[np.asarray(array.is_null())] = 0
        return shifted, int(shifted.max()) + 1, None
    encoded = pc.dictionary_encode(array)
    indices = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False) + np.int64(1)
    return indices, len(encoded.dictionary) + 1, encoded.dictionary.to_pylist()


def _latest_by_sort(table: pa.Table, keys: list[str], order: str) -> pa.Table:
    position = pa.array(np.arange(table.num_rows, dtype=np.int64))
    table = table.append_column("__pos", position)
    table = table.take(pc.sort_indices(table, [(k, "ascending") for k in keys]
                                       + [(order, "ascending"), ("__pos", "ascending")]))
    n = table.num_rows
    same_as_next = np.ones(n - 1, dtype=bool)
    for k in keys:
        eq = pc.equal(table[k].slice(0, n - 1), table[k].slice(1))
        same_as_next &= pc.fill_null(eq, False).to_numpy(zero_copy_only=False)
    last = np.ones(n, dtype=bool)
    last[:-1] = ~same_as_next
    return table.filter(pa.array(last)).drop_columns(["__pos"])


class Table:
    """One metadata table: `folder` with rows of `schema`, bucketed by `item_id`."""

    def __init__(self, folder: Path, schema: pa.Schema, keys: list[str], order: str):
        self.folder = folder
        self.schema = schema
        self.keys = keys
        self.order = order
        self._migrated = False

    # ------------------------------------------------------------------ write
    def append(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        """Append rows: one fragment per bucket touched."""
        self._migrate()
        if isinstance(rows, pa.Table):
            data = rows.select(self.schema.names).cast(self.schema)
        else:
            if not rows:
                return
            data = pa.Table.from_pylist(
                [{name: row.get(name) for name in self.schema.names} for row in rows], schema=self.schema)
        if data.num_rows == 0:
            return
        buckets = [bucket_of(i) for i in data["item_id"].to_pylist()]
        if len(set(buckets)) == 1:
            self._append_bucket(buckets[0], data)
            return
        codes = pa.array(buckets).dictionary_encode()
        for index, name in enumerate(codes.dictionary.to_pylist()):
            self._append_bucket(name, data.filter(pc.equal(codes.indices, index)))

    def _append_bucket(self, bucket: str, data: pa.Table) -> None:
        folder = self.folder / bucket
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(data, folder, f"part-{_stem()}.parquet")
        parts = sum(1 for e in os.scandir(folder) if e.name.startswith("part-"))
        if parts >= COMPACT_AT:
            self.compact(bucket)

    # ------------------------------------------------------------------ merge
    def compact(self, bucket: str, full: bool = False) -> bool:
        """Merge a bucket's fragments (and its segments, once there are many, or with `full`:
        everything into one segment of the current schema). Returns False when another writer
        holds the bucket's lock."""
        folder = self.folder / bucket
        lock = folder / ".merge.lock"
        if not _acquire(lock):
            return False
        try:
            names, replaced = _listing(folder)
            live = [n for n in names if n not in replaced]
            parts = [n for n in live if n.startswith("part-")]
            segments = [n for n in live if n.startswith("seg-")]
            inputs = parts + (segments if full or len(segments) + 1 >= MAX_SEGMENTS else [])
            if len(inputs) >= 2 or (full and inputs):
                data = self._read_files([folder / n for n in sorted(inputs)])
                data = data.replace_schema_metadata({_INPUTS_KEY: json.dumps(sorted(inputs)).encode()})
                _write_atomic(data, folder, f"seg-{_stem()}.parquet")
            else:
                inputs = []
            # what a segment replaced goes first, then oldest segments first: a merger killed
            # here leaves only files that some segment still says it replaced
            doomed = sorted(set(inputs) | (replaced & set(names)),
                            key=lambda n: (n.startswith("seg-"), n))
            for name in doomed:
                _unlink(folder / name)
            return True
        finally:
            _release(lock)

    # ------------------------------------------------------------------- read
    def read_item(self, item_id: str, columns: list[str] | None = None) -> pa.Table:
        """Every row of one item (its bucket only)."""
        self._migrate()
        table = self._read_buckets([self.folder / bucket_of(item_id)], columns,
                                   pc.field("item_id") == item_id)
        return table

    def read_all(self, columns: list[str] | None = None, dictionary: bool = False) -> pa.Table:
        """Every row of the table; with `dictionary`, text columns come dictionary-encoded,
        one dictionary per column (cheaper to read and to group by)."""
        self._migrate()
        if not self.folder.is_dir():
            return self._empty(columns)
        folders = [Path(e.path) for e in os.scandir(self.folder)
                   if e.is_dir() and e.name.startswith("bucket=")]
        table = self._read_buckets(folders, columns, None, dictionary)
        return table.unify_dictionaries() if dictionary else table

    def latest_item(self, item_id: str) -> pa.Table:
        return latest_rows(self.read_item(item_id), self.keys, self.order)

    def latest_all(self, columns: list[str] | None = None) -> pa.Table:
        if columns is not None:
            columns = list(dict.fromkeys(list(self.keys) + [self.order] + columns))
        return latest_rows(self.read_all(columns), self.keys, self.order)

    def _empty(self, columns: list[str] | None) -> pa.Table:
        table = self.schema.empty_table()
        return table.select(columns) if columns is not None else table

    def _read_files(self, paths: list[Path], columns: list[str] | None = None,
                    filter: Any = None, dictionary: bool = False) -> pa.Table:
        schema, fmt = self.schema, "parquet"
        if dictionary:
            text = [f.name for f in self.schema if pa.types.is_string(f.type)]
            schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in text else f
                                for f in self.schema])
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=text))
        if not paths:
            table = schema.empty_table()
            return table.select(columns) if columns is not None else table
        dataset = ds.dataset([str(p) for p in paths], schema=schema, format=fmt)
        return dataset.to_table(columns=columns, filter=filter)

    def _read_buckets(self, folders: list[Path], columns: list[str] | None, filter: Any,
                      dictionary: bool = False) -> pa.Table:
        """Read the live files of some buckets. A listing can race a merge (a file renamed or
        deleted meanwhile): then the read starts again."""
        for _ in range(_READ_TRIES):
            try:
                before = {}
                paths = []
                for folder in folders:
                    if not folder.is_dir():
                        continue
                    names, replaced = _listing(folder)
                    before[folder] = set(names)
                    paths += [folder / n for n in names if n not in replaced]
                table = self._read_files(paths, columns, filter, dictionary)
            except (FileNotFoundError, OSError):
                time.sleep(0.01)
                continue
            if all(_no_new_segments(folder, names) for folder, names in before.items()):
                return table
            time.sleep(0.01)
        raise RuntimeError(f"could not get a stable read of {self.folder} (files kept changing)")

    # -------------------------------------------------------------- migration
    def _migrate(self) -> None:
        """Move fragments of the old layout (part-*.parquet directly in the table's folder)
        into their buckets; renames are atomic, so concurrent migrators and kills are safe."""
        if self._migrated:
            return
        self._migrated = True
        if not self.folder.is_dir():
            return
        touched: set[str] = set()
        for entry in os.scandir(self.folder):
            if not entry.is_file():
                continue
            if entry.name.startswith("."):
                if entry.name.endswith(".tmp"):  # a killed writer's temporary
                    _unlink(entry.path)
                continue
            if not entry.name.endswith(".parquet"):
                continue
            try:
                data = self._read_files([Path(entry.path)])
            except (FileNotFoundError, OSError):
                continue  # moved by another migrator meanwhile
            buckets = sorted({bucket_of(i) for i in data["item_id"].to_pylist()})
            if len(buckets) == 1:  # the old layout's fragments hold one item: move it as it is
                (self.folder / buckets[0]).mkdir(exist_ok=True)
                try:
                    os.replace(entry.path, self.folder / buckets[0] / f"part-{_stem()}.parquet")
                except FileNotFoundError:
                    continue
            else:
                ids = data["item_id"].to_pylist()
                for bucket in buckets:
                    (self.folder / bucket).mkdir(exist_ok=True)
                    mask = pa.array([bucket_of(i) == bucket for i in ids])
                    _write_atomic(data.filter(mask), self.folder / bucket, f"part-{_stem()}.parquet")
                _unlink(entry.path)
            touched.update(buckets)
        for bucket in sorted(touched):  # old fragments lack newer columns: rewrite them
            self.compact(bucket, full=True)


def _listing(folder: Path) -> tuple[list[str], set[str]]:
    """Parquet files of a bucket and the set of those some segment replaced."""
    names = sorted(e.name for e in os.scandir(folder)
                   if e.name.endswith(".parquet") and not e.name.startswith("."))
    replaced: set[str] = set()
    for name in names:
        if name.startswith("seg-"):
            metadata = pq.read_schema(folder / name).metadata or {}
            replaced.update(json.loads(metadata.get(_INPUTS_KEY, b"[]")))
    return names, replaced


def _no_new_segments(folder: Path, before: set[str]) -> bool:
    """True when no segment appeared since `before` was listed (new fragments are fine:
    they are later writes)."""
    return all(e.name in before for e in os.scandir(folder)
               if e.name.startswith("seg-") and e.name.endswith(".parquet"))


def _acquire(lock: Path) -> bool:
    # The holder is written to a file of its own first and linked into place, so a lock is
    # never seen without its holder (a writer killed between creating and filling it would
    # leave one that no check could call stale).
    holder = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    holder.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
    try:
        for _ in range(2):
            try:
                os.link(holder, lock)
            except FileExistsError:
                if _lock_is_stale(lock):
                    _unlink(lock)
                    continue
                return False
            return True
        return False
    finally:
        _unlink(holder)


def _lock_is_stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
        holder = json.loads(lock.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return True
    if age > LOCK_STALE_SECONDS:
        return True
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0)))


def _release(lock: Path) -> None:
    _unlink(lock)


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
