"""The store at dataset scale, measured on this machine with tiny models.

Array half (this part): peak memory of `freetalk generate` for an 8 s pair and the same pair
looped to 60 s (`bench_memory`), the store's bytes and files per output frame for the 5 s
sample pair (`bench_size`), and the codec measurement behind `storage.store.array_compressors`
(`bench_codecs`).

    python bench/store_scale.py --only size,codecs      # about 3 minutes on 2 CPU cores
    python bench/store_scale.py --only memory           # about 15-20 minutes (the 60 s pair)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
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
    """`freetalk generate` in a child process: its peak RSS (bytes) and wall seconds."""
    command = [sys.executable, "-m", "flows.cli", "generate", str(identity), str(lip_ref),
               "-o", str(store.parent / f"{store.name}.mp4"), "--store", str(store),
               "--models", str(models), "--steps", str(STEPS), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"generate failed ({child.returncode}): {stderr.decode()[-2000:]}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": time.perf_counter() - start}


def bench_memory(work: Path | None = None) -> dict:
    """Peak RSS of `generate` on an 8 s pair and the same pair looped to 60 s."""
    work = Path(work or tempfile.mkdtemp(prefix="freetalk-memory-"))
    models = _tiny_models(work)
    result = {}
    for seconds in (8, 60):
        identity = looped_clip(SAMPLES / IDENTITY, work / f"identity_{seconds}s.mp4", seconds)
        lip_ref = looped_clip(SAMPLES / LIP_8S, work / f"lip_{seconds}s.mp4", seconds)
        result[f"{seconds}s"] = run_generate(identity, lip_ref, work / f"store_{seconds}s", models)
    result["ratio_60s_to_8s"] = result["60s"]["peak_rss_bytes"] / result["8s"]["peak_rss_bytes"]
    return result


def _tree(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def bench_size(work: Path | None = None) -> dict:
    """Store bytes and files per output frame for the 5 s sample pair, and per array."""
    import zarr

    work = Path(work or tempfile.mkdtemp(prefix="freetalk-size-"))
    models = _tiny_models(work)
    store_dir = work / "store_5s"
    run = run_generate(SAMPLES / IDENTITY, SAMPLES / LIP_5S, store_dir, models)
    (item_dir,) = (store_dir / "items").iterdir()
    n_frames = zarr.open_group(item_dir, mode="r")["face_crop"].attrs["n_frames"]
    total, files = _tree(store_dir)
    arrays = {}
    for meta in sorted(item_dir.rglob("zarr.json")):
        folder = meta.parent
        if any(p.name == "c" for p in folder.iterdir()):
            arrays[str(folder.relative_to(item_dir))] = _tree(folder)[0]
    return {"frames": n_frames, "store_bytes": total, "files": files,
            "bytes_per_frame": total / n_frames, "files_per_frame": files / n_frames,
            "array_bytes_per_frame": {k: v / n_frames for k, v in sorted(arrays.items(), key=lambda kv: -kv[1])},
            "store": str(store_dir), "run": run}


CODECS = {
    "zarr default (zstd 0)": lambda z: [z.ZstdCodec(level=0)],
    "blosc zstd 3 noshuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")],
    "blosc zstd 3 shuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc zstd 3 bitshuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc zstd 7 shuffle": lambda z: [z.BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")],
    "blosc lz4 5 shuffle": lambda z: [z.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
}


def bench_codecs(store_dir: Path | None = None, arrays=("face_crop/identity_crops", "face_crop/mouth_masks",
                                                         "diffusion/frames", "optical_flow/generated_flow",
                                                         "clip_embed/structure_embeddings")) -> dict:
    """Bytes and write + read seconds of each candidate codec on the arrays of a real item
    (`bench_size`'s store unless given)."""
    import zarr
    import zarr.codecs as codecs
    from zarr.storage import MemoryStore

    store_dir = Path(store_dir or bench_size()["store"])
    (item_dir,) = (store_dir / "items").iterdir()
    group = zarr.open_group(item_dir, mode="r")
    result: dict[str, dict] = {}
    for name in arrays:
        source = group[name]
        data = source[...]
        result[name] = {"dtype": str(data.dtype), "raw_bytes_per_frame": data.nbytes / data.shape[0]}
        for label, make in CODECS.items():
            memory = MemoryStore()
            start = time.perf_counter()
            target = zarr.create_array(memory, shape=data.shape, dtype=data.dtype, chunks=source.chunks,
                                       compressors=make(codecs), fill_value=0)
            target[...] = data
            written = time.perf_counter() - start
            start = time.perf_counter()
            np.asarray(target[...])
            read = time.perf_counter() - start
            size = sum(len(v.to_bytes()) for v in memory._store_dict.values())
            result[name][label] = {"bytes_per_frame": size / data.shape[0],
                                   "write_s": round(written, 3), "read_s": round(read, 3)}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="size,codecs,memory", help="comma list of: size, codecs, memory")
    parser.add_argument("--work", type=Path, default=None, help="folder for clips, models and stores")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(","))
    out = {}
    if wanted & {"size", "codecs"}:
        out["size"] = bench_size(args.work)
    if "codecs" in wanted:
        out["codecs"] = bench_codecs(out["size"]["store"])
    if "memory" in wanted:
        out["memory"] = bench_memory(args.work)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
