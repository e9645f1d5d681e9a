"""How the store scales: metadata append and read costs at 1k and 1M stage rows, `freetalk
status` at 10,000 items / 1,000,000 stage rows, peak memory of `freetalk generate` on an 8 s
and a 60 s pair (`memory`, 20+ minutes here), and store bytes per output frame with the codec
measurement behind `storage.store.array_compressors` (`size`, a 5 s pair).

    python bench/store_scale.py [--only metadata,status,delta,memory,size] [--dir DIR]

`delta` runs the same appends and per-item reads on a Delta Lake table (needs `deltalake`,
which freetalk does not depend on).

Each `bench_*` function returns rows of (measure, value, unit) for the printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import STAGES, Store  # noqa: E402
from storage.store import STAGE_SCHEMA  # noqa: E402

APPENDS = 200
ITEMS = 10_000
ROWS = 1_000_000


def bulk_stage_rows(store: Store, n_rows: int, n_items: int, pieces: int = 40) -> None:
    """`n_rows` done stage rows spread evenly over `n_items` items, written in `pieces` bulk
    appends (so buckets hold fragments and segments, as after a long run)."""
    per_item = max(1, n_rows // n_items)
    j = np.tile(np.arange(per_item), n_items)
    items = np.repeat(np.array([f"item-{i:05d}" for i in range(n_items)], dtype=object), per_item)
    stage_names = np.array(STAGES, dtype=object)
    n = len(j)
    now = datetime.now(timezone.utc)
    table = pa.table({
        "item_id": pa.array(items, pa.string()),
        "stage": pa.array(stage_names[j % len(STAGES)], pa.string()),
        "chunk": pa.array(j // len(STAGES), pa.int64()),
        "status": pa.array(np.full(n, "done", dtype=object), pa.string()),
        "seconds": pa.array(np.full(n, 0.5)),
        "frames": pa.array(np.full(n, 4, dtype=np.int64)),
        "cache_key": pa.array(np.full(n, "key", dtype=object), pa.string()),
        "error": pa.nulls(n, pa.string()),
        "finished_at": pa.array(np.full(n, now), STAGE_SCHEMA.field("finished_at").type),
    }, schema=STAGE_SCHEMA)
    order = np.random.default_rng(0).permutation(n)  # rows of all items in every piece
    for piece in np.array_split(order, pieces):
        store._tables["stages"].append(table.take(pa.array(piece)))


def time_appends(store: Store, n: int = APPENDS, first_chunk: int = 0) -> tuple[float, float, float]:
    """Milliseconds per `record_stage` of a new item's chunks: median wall time, median CPU
    time of this process, and mean wall time (which includes the merges the appends trigger)."""
    times, cpu = [], []
    for chunk in range(first_chunk, first_chunk + n):
        start, start_cpu = time.perf_counter(), time.process_time()
        store.record_stage("appended-item", "diffusion", chunk, "done", seconds=1.0, frames=4,
                           cache_key="key")
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(times), 1000 * statistics.median(cpu), 1000 * statistics.mean(times)


def time_done_chunks(store: Store, item_id: str, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        store.done_chunks(item_id, "diffusion", "key")
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_metadata(workdir: Path, rounds: int = 5) -> list[tuple[str, float, str]]:
    """Appends to both tables in alternating rounds, so a busy machine slows both alike."""
    sizes = (("1k", 1_000, 10), ("1M", ROWS, ITEMS))
    stores = {}
    for label, n_rows, n_items in sizes:
        stores[label] = Store(workdir / f"metadata-{label}")
        bulk_stage_rows(stores[label], n_rows, n_items)
    timings: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in sizes}
    per_round = APPENDS // rounds
    for r in range(rounds):
        for label, store in stores.items():
            timings[label].append(time_appends(store, per_round, first_chunk=r * per_round))
    rows = []
    for label, store in stores.items():
        rows.append((f"record_stage at {label} rows (median)",
                     statistics.median(t[0] for t in timings[label]), "ms"))
        rows.append((f"record_stage at {label} rows (median CPU time)",
                     statistics.median(t[1] for t in timings[label]), "ms"))
        rows.append((f"record_stage at {label} rows (mean, merges included)",
                     statistics.mean(t[2] for t in timings[label]), "ms"))
        rows.append((f"done_chunks at {label} rows (item with 100 rows)",
                     time_done_chunks(store, "item-00001"), "ms"))
        rows.append((f"done_chunks at {label} rows (item with {APPENDS} appended rows)",
                     time_done_chunks(store, "appended-item"), "ms"))
    return rows


def bench_status(workdir: Path) -> list[tuple[str, float, str]]:
    store = Store(workdir / "status")
    start = time.perf_counter()
    store.register_items([{"item_id": f"item-{i:05d}", "identity": f"id/{i}.mp4",
                           "lip_ref": f"lip/{i}.mp4"} for i in range(ITEMS)])
    registered = time.perf_counter() - start
    bulk_stage_rows(store, ROWS, ITEMS)
    for i in range(0, 50):
        store.record_item(f"item-{i:05d}", "done", output=f"out/{i}.mp4")
    store.record_failure("a b", "item_id 'a b' is not a valid id")

    def timed(fn, repeats: int = 3) -> tuple[float, float]:
        """Median wall seconds and median CPU seconds (this process and its children)."""
        times, cpu = [], []
        for _ in range(repeats):
            before = _cpu_seconds()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - before)
        return statistics.median(times), statistics.median(cpu)

    records = store.status()
    assert len(records) == ITEMS + 1, len(records)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "flows.cli", "status", str(store.root)]
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, env=env)
    assert len(json.loads(done.stdout)) == ITEMS + 1, done.stderr[-2000:]
    rows = [(f"register_items of {ITEMS} pending items (one append)", 1000 * registered, "ms")]
    # While runs write (buckets of fragments and segments), then once they ended (`Store.run`
    # compacts each bucket at its end).
    for when in ("during runs", "after runs"):
        if when == "after runs":
            start = time.perf_counter()
            store.compact()
            rows.append((f"Store.compact() of {ROWS} stage rows", time.perf_counter() - start, "s"))
        files = sum(1 for _ in (store.root / "metadata" / "stages").rglob("*.parquet"))
        rows.append((f"{when}: stages table files", files, "files"))
        for label, (wall, cpu) in (
                (f"Store.status() at {ITEMS} items / {ROWS} stage rows", timed(store.status)),
                ("freetalk status --json (subprocess)",
                 timed(lambda: subprocess.run(command + ["--json"], capture_output=True, env=env))),
                ("freetalk status, table (subprocess)",
                 timed(lambda: subprocess.run(command, capture_output=True, env=env)))):
            rows.append((f"{when}: {label}, median of 3", wall, "s"))
            rows.append((f"{when}: {label}, CPU time", cpu, "s"))
    return rows


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OptionalDependencyMissing(RuntimeError):
    """A bench whose optional package is not installed: reported and left out of the table."""


def bench_delta(workdir: Path) -> list[tuple[str, float, str]]:
    """The same appends and per-item reads on a Delta Lake table (`deltalake`, if installed),
    the maintained format the store's own layout was measured against."""
    try:
        from deltalake import DeltaTable, write_deltalake
    except ImportError as exc:
        raise OptionalDependencyMissing("bench_delta needs the deltalake package (pip install deltalake)") from exc
    import pyarrow.compute as pc

    def one_row(i: int) -> pa.Table:
        return pa.Table.from_pylist([{"item_id": "appended-item", "stage": "diffusion", "chunk": i,
                                      "status": "done", "seconds": 1.0, "frames": 4, "cache_key": "key",
                                      "error": None, "finished_at": datetime.now(timezone.utc)}],
                                    schema=STAGE_SCHEMA)

    def appends(path: Path, start: int, n: int) -> float:
        times = []
        for i in range(start, start + n):
            t = time.perf_counter()
            write_deltalake(str(path), one_row(i), mode="append")
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    def read_item(path: Path) -> float:
        t = time.perf_counter()
        DeltaTable(str(path)).to_pyarrow_dataset().to_table(filter=pc.field("item_id") == "item-00001")
        return 1000 * (time.perf_counter() - t)

    rows = []
    for label, n_rows, n_items in (("1k", 1_000, 10), ("1M", ROWS, ITEMS)):
        path = workdir / f"delta-{label}"
        scratch = Store(workdir / f"scratch-{label}")
        bulk_stage_rows(scratch, n_rows, n_items, pieces=1)
        write_deltalake(str(path), scratch._read("stages"), mode="append")
        rows.append((f"delta: append at {label} rows (median of {APPENDS} commits)",
                     appends(path, 0, APPENDS), "ms"))
        rows.append((f"delta: read one item at {label} rows after {APPENDS} commits", read_item(path), "ms"))
        if label == "1k":
            rows.append((f"delta: append at {label} rows, commits {APPENDS}-1000",
                         appends(path, APPENDS, 1000 - APPENDS), "ms"))
            rows.append((f"delta: read one item at {label} rows after 1000 commits", read_item(path), "ms"))
    return rows


# ----------------------------------------------------------------- memory and size
# `freetalk generate` with tiny models and few diffusion steps on the sample clips.
SAMPLES = Path(os.environ.get("FREETALK_SAMPLES", ROOT.parent / "shared" / "samples"))
EOS = Path(os.environ.get("FREETALK_EOS_DIR", ROOT.parent / "shared" / "models" / "eos"))
IDENTITY = "SadTalker__WDA_KatieHill_000.mp4"  # 8 s, 512 x 512
LIP_8S = "SadTalker__WDA_AlexandriaOcasioCortez_000.mp4"  # 8 s
LIP_5S = "MimicTalk__May_5s.mp4"  # 5 s
STEPS = 2


def _tiny_models(folder: Path) -> Path:
    from freetalk_core.models import write_tiny_models

    models = folder / "models"
    if not models.exists():
        write_tiny_models(models, eos_source=EOS)
    return models


def looped_clip(source: Path, out: Path, seconds: float, fps: float = 25.0) -> Path:
    """`source` repeated until it lasts `seconds`, written without audio, one frame in memory."""
    from freetalk_core import video

    n = video.output_frame_count(seconds, fps)

    def frames():
        written = 0
        while written < n:
            for frame in video.read_frames(source, fps=fps):
                if written == n:
                    return
                yield frame
                written += 1

    return video.write_video(out, frames(), fps)


def run_generate(identity: Path, lip_ref: Path, store: Path, models: Path, *extra: str) -> dict:
    """`freetalk generate` in a child process: its peak RSS (bytes, `wait4`'s ru_maxrss) and
    wall seconds."""
    command = [sys.executable, "-m", "flows.cli", "generate", str(identity), str(lip_ref),
               "-o", str(store.parent / f"{store.name}.mp4"), "--store", str(store),
               "--models", str(models), "--steps", str(STEPS), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"generate failed ({code}): {stderr.decode()[-2000:]}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": time.perf_counter() - start}


def bench_memory(workdir: Path) -> list[tuple[str, float, str]]:
    """Peak RSS of `generate` on an 8 s pair and the same pair looped to 60 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    models = _tiny_models(workdir)
    rows, peaks = [], {}
    for seconds in (8, 60):
        identity = looped_clip(SAMPLES / IDENTITY, workdir / f"identity_{seconds}s.mp4", seconds)
        lip_ref = looped_clip(SAMPLES / LIP_8S, workdir / f"lip_{seconds}s.mp4", seconds)
        run = run_generate(identity, lip_ref, workdir / f"store_{seconds}s", models)
        peaks[seconds] = run["peak_rss_bytes"]
        rows += [(f"generate {seconds} s pair: peak RSS", run["peak_rss_bytes"] / 1e9, "GB"),
                 (f"generate {seconds} s pair: wall time", run["seconds"], "s")]
    rows.append(("peak RSS 60 s / 8 s", peaks[60] / peaks[8], "x"))
    return rows


def _tree(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def size_of_item(store_dir: Path) -> dict:
    """Bytes and files of a store holding one item, in total and per array, per output frame."""
    import zarr

    (item_dir,) = (store_dir / "items").iterdir()
    n_frames = zarr.open_group(item_dir, mode="r")["face_crop"].attrs["n_frames"]
    total, files = _tree(store_dir)
    arrays = {}
    for meta in sorted(item_dir.rglob("zarr.json")):
        if (meta.parent / "c").is_dir():
            arrays[str(meta.parent.relative_to(item_dir))] = _tree(meta.parent)[0]
    return {"frames": n_frames, "bytes": total, "files": files, "arrays": arrays}


def bench_size(workdir: Path) -> list[tuple[str, float, str]]:
    """Store bytes and files per output frame for the 5 s sample pair, and its largest arrays."""
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir = workdir / "store_5s"
    run_generate(SAMPLES / IDENTITY, SAMPLES / LIP_5S, store_dir, _tiny_models(workdir))
    size = size_of_item(store_dir)
    n = size["frames"]
    rows = [("5 s pair: store bytes per output frame", size["bytes"] / n / 1e6, "MB"),
            ("5 s pair: store files", size["files"], "files"),
            ("5 s pair: output frames", n, "frames")]
    for name, nbytes in sorted(size["arrays"].items(), key=lambda kv: -kv[1])[:8]:
        rows.append((f"  {name} per output frame", nbytes / n / 1e3, "kB"))
    rows += bench_codecs(store_dir)
    return rows


CODECS = {
    "zarr default zstd 0": lambda z: [z.ZstdCodec(level=0)],
    "blosc zstd 3 noshuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")],
    "blosc zstd 3 shuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc zstd 3 bitshuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc zstd 7 shuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")],
    "blosc lz4 5 shuffle": lambda z: [z.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
}
CODEC_ARRAYS = ("structure_render/frames", "face_crop/mouth_masks", "diffusion/frames",
                "optical_flow/generated_flow", "clip_embed/structure_embeddings")


def bench_codecs(store_dir: Path) -> list[tuple[str, float, str]]:
    """Bytes per output frame and write + read seconds of each candidate codec on the arrays of
    a real item (the codec behind `storage.store.array_compressors`)."""
    import zarr
    import zarr.codecs as codecs
    from zarr.storage import MemoryStore

    (item_dir,) = (store_dir / "items").iterdir()
    group = zarr.open_group(item_dir, mode="r")
    rows = []
    for name in CODEC_ARRAYS:
        source = group[name]
        data = source[...]
        rows.append((f"{name} ({data.dtype}) raw per frame", data.nbytes / data.shape[0] / 1e3, "kB"))
        for label, make in CODECS.items():
            memory = MemoryStore()
            start = time.perf_counter()
            target = zarr.create_array(memory, shape=data.shape, dtype=data.dtype, chunks=source.chunks,
                                       shards=source.shards, compressors=make(codecs), fill_value=0)
            target[...] = data
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            np.asarray(target[...])
            seconds_read = time.perf_counter() - start
            size = sum(len(v.to_bytes()) for v in memory._store_dict.values())
            rows += [(f"  {label}: per frame", size / data.shape[0] / 1e3, "kB"),
                     (f"  {label}: write / read", seconds, f"s / {seconds_read:.3f} s")]
    return rows


BENCHES = {"metadata": bench_metadata, "status": bench_status, "delta": bench_delta,
           "memory": bench_memory, "size": bench_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="metadata,status",
                        help=f"comma-separated benches among {', '.join(BENCHES)}")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder [a temporary one]")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench(es) {', '.join(unknown)}; choose among {', '.join(BENCHES)}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = []
        for name in names:
            try:
                results += BENCHES[name](Path(tmp) / name)
            except OptionalDependencyMissing as exc:
                print(f"{name}: {exc}", file=sys.stderr)
    width = max([len(r[0]) for r in results] + [10])
    print(f"{'measure':<{width}}  {'value':>10}  unit")
    for measure, value, unit in results:
        print(f"{measure:<{width}}  {value:>10.3f}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
