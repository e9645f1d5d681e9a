"""The `dataset` flow: every pair of a manifest across Dask workers, resumable, one failure
never stops the rest.

Each item is three Prefect tasks on the Dask cluster, chained through small references (the
job, stage keys, `StageRef`s; arrays stay in the store): `prepare[item]` runs the CPU stages
up to the controller, `diffusion[item]` the diffusion stage under the `GPU` resource (one
diffusion at a time per GPU, while the worker's other thread prepares the next item), and
`finish[item]` optical flow, the noise filter and the item's `done` row.
"""

from __future__ import annotations

import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dask
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel

from flows.generate import begin_item, complete_item, make_job, run_stages, stage_keys
from flows.runtime import store_settings
from freetalk_core.errors import FreetalkError
from storage import STAGES, Store
from storage.arrays import DIFFUSION, NOISE_FILTER
from storage.store import check_item_id
from tasks.common import MODEL_PARTS, ItemJob, StageRef, model_loads, models_fingerprint, one_line

REQUIRED_COLUMNS = ("item_id", "identity", "lip_ref")
PREPARE_STAGES = STAGES[:STAGES.index(DIFFUSION)]
GPU_STAGES = (DIFFUSION,)
FINISH_STAGES = STAGES[STAGES.index(DIFFUSION) + 1:]
GPU = {"GPU": 1}
"""The Dask resource a diffusion task holds: local workers declare one each; on a scheduler
given by address, workers started with `--resources GPU=1` take the diffusion tasks."""


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV or Parquet manifest with `item_id, identity, lip_ref[, audio]`; relative
    paths are taken from the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FreetalkError(f"manifest not found: {path}")
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
    else:  # every column as text: an item_id like 007 stays 007
        with open(path, newline="") as f:
            header = [c.strip() for c in f.readline().split(",")]
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True))
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FreetalkError(f"manifest {path} lacks column(s) {', '.join(missing)}; "
                            f"it needs {', '.join(REQUIRED_COLUMNS)} and optionally audio")
    rows = []
    for row in table.to_pylist():
        row["item_id"] = "" if row["item_id"] is None else str(row["item_id"])
        for key in ("identity", "lip_ref", "audio"):
            if row.get(key):
                p = Path(str(row[key])).expanduser()
                row[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        rows.append(row)
    ids = [r["item_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise FreetalkError(f"manifest {path} repeats item_id values; each must be unique")
    return rows


def run_fields(run_id: str | None) -> dict[str, str]:
    return {"run_id": run_id} if run_id is not None else {}


# ------------------------------------------------------------------------- the units of work
class ItemProgress(BaseModel):
    """What travels between an item's tasks: references only."""

    job: ItemJob
    key_of: dict[str, str]
    refs: dict[str, StageRef]
    seconds: float
    run_id: str | None = None


def worker_name() -> str:
    """The Dask worker running this task (`host:pid` outside Dask)."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def item_failures(store: Store, item_id: str, **fields: Any) -> Iterator[None]:
    """Record any failure of the body as the item's one-line reason, then let it fail the task."""
    try:
        yield
    except BaseException as exc:
        store.record_failure(item_id, one_line(exc), **fields)
        try:
            store.log_failure(item_id, exc, context=f"dataset item {item_id}")
        except (OSError, ValueError):  # the reason is recorded; the traceback goes to the run's log below
            pass
        get_run_logger().error("%s failed: %s", item_id, one_line(exc),
                               exc_info=not isinstance(exc, FreetalkError))
        raise


@task(name="prepare", task_run_name="prepare[{item_id}]", cache_policy=NO_CACHE)
def prepare_item(item_id: str, row: dict, store: str, models: str, settings: dict,
                 run_id: str | None = None) -> ItemProgress:
    """Hash the inputs, record the item running, run the stages before diffusion."""
    start = time.perf_counter()
    db = Store(store)
    with item_failures(db, item_id, identity=row.get("identity"), lip_ref=row.get("lip_ref"),
                       **run_fields(run_id)), store_settings(db.root):
        job = make_job(row["identity"], row["lip_ref"], audio=row.get("audio") or None, store=store,
                       models=models, item_id=item_id, **settings)
        keys = stage_keys(job)
        begin_item(db, job, **run_fields(run_id))
        refs = run_stages(job, keys, PREPARE_STAGES)
    return ItemProgress(job=job, key_of=keys, refs=refs, seconds=time.perf_counter() - start, run_id=run_id)


@task(name="diffusion-item", task_run_name="diffusion-item[{item_id}]", cache_policy=NO_CACHE)
def diffuse_item(item_id: str, item: ItemProgress) -> ItemProgress:
    """The diffusion stage of one item (holds the worker's GPU)."""
    start = time.perf_counter()
    db = item.job.open_store()
    with item_failures(db, item_id, **run_fields(item.run_id)), store_settings(db.root):
        refs = run_stages(item.job, item.key_of, GPU_STAGES, item.refs)
    return item.model_copy(update={"refs": refs, "seconds": item.seconds + time.perf_counter() - start})


@task(name="finish", task_run_name="finish[{item_id}]", cache_policy=NO_CACHE)
def finish_item(item_id: str, item: ItemProgress) -> dict[str, Any]:
    """Optical flow, the noise filter and the output; records the item done."""
    start = time.perf_counter()
    db = item.job.open_store()
    with item_failures(db, item_id, **run_fields(item.run_id)), store_settings(db.root):
        refs = run_stages(item.job, item.key_of, FINISH_STAGES, item.refs)
        output = complete_item(db, item.job, refs, **run_fields(item.run_id))
    return {"status": "done", "output": output, "worker": worker_name(),
            "seconds": round(item.seconds + time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------- the task runner
def default_workers() -> int:
    """One single-threaded worker per core, fewer where memory is short (about 4 GB each)."""
    import psutil

    return max(1, min(os.cpu_count() or 1, psutil.virtual_memory().total // (4 << 30)))


def dataset_task_runner(workers: int | None = None, address: str | None = None) -> DaskTaskRunner:
    """The Dask cluster a dataset runs on.

    `address` (or `$FREETALK_DASK_ADDRESS`): an existing scheduler. Else `workers` (or
    `$FREETALK_WORKERS`) single-threaded local worker processes. Else, on a CUDA host with
    dask-cuda installed, one worker per GPU (two threads: diffusion of one item while the
    CPU stages of the next run); else one worker per core."""
    address = address or os.environ.get("FREETALK_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("FREETALK_WORKERS") or 0) or None
    if workers is None and _cuda_devices() and _has_dask_cuda():
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"threads_per_worker": 2, "resources": GPU,
                                              "dashboard_address": ":0"})
    if workers is None and _cuda_devices():
        workers = 1  # without dask-cuda every worker would share GPU 0
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers or default_workers(),
                                          "threads_per_worker": 1, "processes": True,
                                          "resources": GPU, "dashboard_address": ":0"})


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _has_dask_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("dask_cuda") is not None


def _dask_client():
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return runner.client if isinstance(runner, DaskTaskRunner) else None


def _gpu_annotation() -> dict:
    """The Dask annotation of diffusion tasks: the GPU resource, unless no worker of the
    cluster declares one."""
    client = _dask_client()
    workers = client.scheduler_info().get("workers", {}) if client else {}
    if workers and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
        get_run_logger().warning("no Dask worker declares a GPU resource (start workers with "
                                 "--resources GPU=1); diffusion runs on any worker")
        return {}
    return {"resources": GPU}


# ---------------------------------------------------------------------------------- the report
class DatasetReport:
    """The run's progress artifact and its table of items, updated as items finish."""

    TABLE_EVERY_S = 5.0

    def __init__(self, name: str, item_ids: list[str]):
        from prefect.artifacts import create_progress_artifact

        self.key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dataset"
        self.rows = {i: {"item_id": i, "status": "pending", "seconds": None, "worker": None,
                         "output": None, "error": None} for i in item_ids}
        self.progress_id = create_progress_artifact(0.0, key=f"{self.key}-progress",
                                                    description=f"items of {name} finished")
        self.last_table = 0.0

    def update(self, item_id: str, **fields: Any) -> None:
        from prefect.artifacts import update_progress_artifact

        self.rows[item_id].update(fields)
        finished = sum(r["status"] in ("done", "failed", "skipped") for r in self.rows.values())
        update_progress_artifact(self.progress_id, 100.0 * finished / max(len(self.rows), 1))
        if time.monotonic() - self.last_table > self.TABLE_EVERY_S:
            self.table()

    def table(self) -> None:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(list(self.rows.values()), key=f"{self.key}-items",
                              description="every item: status, seconds, worker, output, error")
        self.last_table = time.monotonic()

    def model_loads(self, loads: dict[str, dict[str, int]]) -> None:
        from prefect.artifacts import create_table_artifact

        rows = [{"worker": w, "model": kind, "loads": n} for w, kinds in sorted(loads.items())
                for kind, n in sorted(kinds.items())]
        create_table_artifact(rows or [{"worker": None, "model": None, "loads": 0}],
                              key=f"{self.key}-model-loads",
                              description="model loads per Dask worker process (1 each: loaded once, reused)")


def worker_model_loads() -> dict[str, dict[str, int]]:
    """`{worker: {model kind: loads}}` over the run's Dask workers."""
    client = _dask_client()
    if client is None:
        return {worker_name(): model_loads()}
    names = {addr: str(info.get("name", addr))
             for addr, info in client.scheduler_info().get("workers", {}).items()}
    return {names.get(addr, addr): loads for addr, loads in client.run(model_loads).items()}


# -------------------------------------------------------------------------------------- the flow
def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"dataset[{Path(flow_run.parameters['manifest']).stem}]"


@flow(name="dataset", flow_run_name=_run_name, task_runner=dataset_task_runner(), log_prints=True)
def process_dataset(manifest: str, store: str, models: str, retry_failed: bool = False,
                    keep: str = "all", steps: int = 20, guidance: float = 7.5, seed: int = 42,
                    batch_size: int | None = None, device: str = "auto", kernel_size: int = 5,
                    flow_reference: str = "structure", filter_along_motion: bool = True,
                    noise_window: int = 100, faceid_variant: str = "plus", ip_adapter_scale: float = 1.0,
                    lambda_range: tuple[float, float] = (0.5, 2.0),
                    mark: bool = True, label: str | None = None, face_index: int = 0,
                    face_box: tuple[float, float, float, float] | None = None,
                    detector: str = "dlib", fps: float | None = None) -> dict[str, dict[str, Any]]:
    """Generate every manifest pair not already done, across the Dask cluster.

    Returns `{item_id: {"status": "done"|"failed"|"skipped", "error", "output", "seconds"}}`; a
    failed item has a one-line reason and never stops the others. Items that failed before are
    skipped (reported failed) unless `retry_failed`; items another live run is processing are
    left to it ("skipped"). `fps`: every output's frame rate; None keeps each identity video's."""
    if keep not in ("all", "final"):
        raise FreetalkError(f"keep must be all or final, got {keep!r}")
    logger = get_run_logger()
    settings = dict(steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, device=device,
                    kernel_size=kernel_size, flow_reference=flow_reference,
                    filter_along_motion=filter_along_motion, noise_window=noise_window,
                    faceid_variant=faceid_variant, ip_adapter_scale=ip_adapter_scale,
                    lambda_range=tuple(lambda_range), mark=mark, label=label, keep=keep,
                    face_index=face_index, face_box=face_box, detector=detector, fps=fps)
    rows = read_manifest(manifest)
    db = Store(store)
    db.register_items([row for row in rows if not _row_problem(row)])
    known = {r["item_id"]: r for r in db.items()}
    fingerprints = {part: models_fingerprint(Path(models), part) for part in MODEL_PARTS}
    report = DatasetReport(Path(manifest).stem, [r["item_id"] for r in rows])
    results: dict[str, dict[str, Any]] = {}

    def settle(item_id: str, status: str, **fields: Any) -> None:
        results[item_id] = {"status": status, "error": None, "output": None, "seconds": None, **fields}
        report.update(item_id, status=status, **fields)
        if status == "failed":
            logger.error("%s failed: %s", item_id, fields.get("error"))

    annotation = _gpu_annotation()
    with db.run("dataset") as run_id:
        submitted: dict[str, list] = {}
        for row in rows:
            item_id, current = row["item_id"], known.get(row["item_id"]) or {}
            problem = _row_problem(row)
            if problem:
                db.record_failure(item_id, problem, **run_fields(run_id))
                settle(item_id, "failed", error=problem)
            elif done_as_asked(current, row, db, models, settings, fingerprints):
                settle(item_id, "done", output=current["output"])
            elif current.get("status") == "running":  # `items()` reads a dead run's items as interrupted
                settle(item_id, "skipped", error=f"another live run ({current.get('run_id')}) is processing "
                                                 "it; rerun once that run has ended")
            elif current.get("status") == "failed" and not retry_failed:
                settle(item_id, "failed", error=f"{current.get('error')} (failed before; "
                                                "rerun with --retry-failed to try again)")
            else:
                prepared = prepare_item.submit(item_id, row, str(db.root), models, settings, run_id)
                with dask.annotate(**annotation):
                    generated = diffuse_item.submit(item_id, prepared)
                submitted[item_id] = [prepared, generated, finish_item.submit(item_id, generated)]
        logger.info("%d items: %d to process, %d done before, %d failed, %d held by another run", len(rows),
                    len(submitted), *(sum(r["status"] == s for r in results.values())
                                      for s in ("done", "failed", "skipped")))
        for item_id, outcome in _as_completed(submitted):
            if outcome.get("status") == "done":
                settle(item_id, "done", **{k: outcome[k] for k in ("output", "seconds", "worker")})
            else:
                error = (db.item(item_id) or {}).get("error") or outcome["error"]
                if (db.item(item_id) or {}).get("status") != "failed":
                    db.record_failure(item_id, error, **run_fields(run_id))
                settle(item_id, "failed", error=error)
    report.table()
    loads = worker_model_loads() if submitted else {}
    report.model_loads(loads)
    for worker, kinds in sorted(loads.items()):
        logger.info("model loads in worker %s: %s", worker,
                    ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
    return results


def done_as_asked(current: dict, row: dict, store: Store, models: str, settings: dict,
                  fingerprints: dict[str, str]) -> bool:
    """The item is done, its output is there, and it was made from these settings and models:
    the key of its output, recorded when it was done, is the key they give today (the inputs
    are taken as the store hashed them; files changed in place under the same item id need
    a new id)."""
    if current.get("status") != "done" or not current.get("output") or not Path(current["output"]).exists():
        return False
    try:
        job = make_job(row["identity"], row["lip_ref"], audio=row.get("audio") or None, store=store.root,
                       models=models, item_id=row["item_id"], known_hashes=current, check=False,
                       **settings)
    except Exception:  # noqa: BLE001 - an input gone since: the item's own tasks say why
        return False
    return current.get("output_key") == stage_keys(job, fingerprints)[NOISE_FILTER]


def _row_problem(row: dict) -> str | None:
    """Why a manifest row cannot be processed at all, or None."""
    try:
        check_item_id(row["item_id"])
    except ValueError as exc:
        return f"{exc}; fix the manifest row"
    missing = [c for c in ("identity", "lip_ref") if not row.get(c)]
    if missing:
        return f"manifest row {row['item_id']} has no {' or '.join(missing)}; fill it in"
    return None


def _as_completed(submitted: dict[str, list]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(item_id, outcome)` as items finish: the finish task's result, or `{"error": reason}`
    from the first of the item's tasks that did not complete."""
    from distributed import as_completed

    by_future = {futures[-1].wrapped_future: item_id for item_id, futures in submitted.items()}
    if not by_future:
        return
    for last in as_completed(list(by_future), loop=next(iter(by_future)).client.loop):
        item_id = by_future[last]
        for future in submitted[item_id]:
            try:
                state = future.wrapped_future.result()
            except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
                yield item_id, {"error": f"worker lost while processing the item: {one_line(exc)}"}
                break
            if not state.is_completed():
                yield item_id, {"error": state.message or state.name}
                break
        else:
            yield item_id, state.result()
