"""Dataset throughput on Dask: items per hour with 1 and 2 workers, and model loads per worker.

Tiny random-weight models, ITEMS different pairs of FRAMES frames cut from two sample clips,
`freetalk dataset` (the command line, a fresh store each time) with `--workers 1` then
`--workers 2`, against one Prefect API: `$PREFECT_API_URL`, else a local server started for the
benchmark. Items per hour are over the whole command (Dask cluster start included) and over
the flow's item work alone (first item started to last item finished, from the store's stage
rows); model loads per worker come from the run's `model-loads` artifact.

    .venv/bin/python bench/dataset_scale.py [--items 6] [--frames 10] [--steps 2] [--out DIR]

Writes results.json to DIR (default under the system temp folder).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT.parent / "shared" / "samples"
EOS = Path(os.environ.get("FREETALK_EOS_DIR", ROOT.parent / "shared" / "models" / "eos"))


def make_items(folder: Path, items: int, frames: int) -> Path:
    """`items` different pairs (successive start frames of two people) and their manifest."""
    from freetalk_core import video

    identity = video.read_video(SAMPLES / "SadTalker__WDA_KatieHill_000.mp4", fps=25.0,
                                max_frames=items * 3 + frames)
    lip_ref = video.read_video(SAMPLES / "MimicTalk__May_5s.mp4", fps=25.0, max_frames=items * 3 + frames)
    rows = ["item_id,identity,lip_ref"]
    for i in range(items):
        video.write_video(folder / f"identity{i}.mp4", iter(identity[3 * i:3 * i + frames]), 25.0)
        video.write_video(folder / f"lip{i}.mp4", iter(lip_ref[3 * i:3 * i + frames]), 25.0,
                          audio=SAMPLES / "MimicTalk__May_5s.mp4")
        rows.append(f"item-{i},identity{i}.mp4,lip{i}.mp4")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def model_loads(api: str, key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        with temporary_settings(updates={PREFECT_API_URL: api}):
            async with get_client() as client:
                found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key={"any_": [key]}))
        data = found[0].data
        return json.loads(data) if isinstance(data, str) else data

    return asyncio.run(read())


def item_seconds(store: Path) -> float:
    """First stage row of any item to the last one: the flow's item work, without start-up."""
    from storage import Store

    rows = Store(store).stage_rows()
    starts = [r["finished_at"].timestamp() - r["seconds"] for r in rows]
    return max(r["finished_at"].timestamp() for r in rows) - min(starts)


def run(api: str, manifest: Path, store: Path, models: Path, workers: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", str(manifest), "--store", str(store),
                             "--models", str(models), "--workers", str(workers), "--steps", str(steps),
                             "--guidance", "1"], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dataset run failed: {result.stderr[-2000:]}")
    items = sum(1 for line in manifest.read_text().splitlines()[1:] if line.strip())
    work = item_seconds(store)
    loads = model_loads(api, f"{manifest.stem}-model-loads")
    return {"workers": workers, "items": items, "wall_s": round(wall, 1), "item_work_s": round(work, 1),
            "items_per_hour": round(items / wall * 3600, 1),
            "items_per_hour_item_work": round(items / work * 3600, 1), "model_loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "freetalk-dataset-scale")
    args = parser.parse_args()

    from flows.runtime import configure_environment

    configure_environment()
    import flows.runtime
    from freetalk_core.models import write_tiny_models

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_models(out / "models", eos_source=EOS)
    results = []
    api_context = (nullcontext(os.environ["PREFECT_API_URL"]) if os.environ.get("PREFECT_API_URL")
                   else flows.runtime.prefect_api())
    with api_context as api:
        for workers in (1, 2):
            folder = out / f"workers{workers}"
            folder.mkdir(exist_ok=True)
            manifest = make_items(folder, args.items, args.frames)
            manifest = manifest.rename(folder / f"bench-{workers}w.csv")
            figures = run(api, manifest, folder / "store", out / "models", workers, args.steps)
            results.append(figures)
            print(json.dumps(figures))
    speedup = results[1]["items_per_hour"] / results[0]["items_per_hour"]
    speedup_work = results[1]["items_per_hour_item_work"] / results[0]["items_per_hour_item_work"]
    summary = {"runs": results, "speedup_2_over_1": round(speedup, 2),
               "speedup_2_over_1_item_work": round(speedup_work, 2), "cpus": os.cpu_count(),
               "load_average": os.getloadavg()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
