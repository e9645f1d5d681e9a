"""What every stage task shares: the job description, stage keys, chunk bookkeeping."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from freetalk_core.errors import FreetalkError, one_line  # noqa: F401 - one_line re-exported for the stages
from storage import Store, arrays, sha256_file

CODE_VERSION = "3"
"""Bumped when a stage's results change for the same inputs and parameters."""

KEEP_CHOICES = ("all", "final")
"""What a done item keeps: every stage's arrays, or only its output, stage rows, metrics and
small per-item results (`storage.Store.drop_intermediates`)."""


def is_transient(task, task_run, state) -> bool:
    """Retry condition: retry I/O hiccups and out-of-memory, never a user-fixable error or a
    bug (those fail the same way again)."""
    try:
        state.result()
    except FreetalkError:
        return False
    except (TimeoutError, ConnectionError, BlockingIOError, InterruptedError):
        return True
    except Exception as exc:  # noqa: BLE001 - classified by message below
        return "out of memory" in str(exc).lower()
    return False


STAGE_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=1,
                  retry_condition_fn=is_transient)
"""Options of every stage task. No Prefect result cache: the store's stage rows are the one
record of what is done (Prefect's cache would key on the job, whose absolute paths change when
a store or the models move, and would duplicate what the rows say); a task that finds all its
chunks done returns at once."""


class ItemJob(BaseModel):
    """Everything a stage needs to know about one (identity, lip reference) pair."""

    model_config = ConfigDict(frozen=True)

    store: str
    item_id: str
    identity: str
    lip_ref: str
    audio: str | None = None
    identity_sha256: str
    lip_ref_sha256: str
    audio_sha256: str | None = None
    models: str
    fps: float
    """Frame rate of the output and of all work: the identity video's unless chosen
    (`flows.generate.make_job`); both videos are read at it."""
    face_index: int = 0
    """Which face of the identity speaks where several are in frame: 0 the largest, 1 the next."""
    face_box: tuple[float, float, float, float] | None = None
    """Or the identity's face whose box overlaps this one (x0, y0, x1, y1 frame px) most."""
    detector: str = "dlib"
    """Face detector: dlib (HOG, offline default) or insightface (SCRFD from MODELS/insightface)."""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 42
    ip_adapter_scale: float = 1.0
    faceid_variant: str = "plus"
    lambda_range: tuple[float, float] = (0.5, 2.0)
    flow_reference: str = "structure"
    kernel_size: int = 5
    noise_window: int = 100
    filter_along_motion: bool = True
    batch_size: int | None = None
    chunk_frames: int = 25
    device: str = "auto"
    keep: str = "all"
    mark: bool = True
    """Invisible watermark in the output (off only for research evaluation runs)."""
    label: str | None = None
    """Visible label drawn on the output frames."""

    def open_store(self) -> Store:
        return Store(self.store)

    @property
    def models_dir(self) -> Path:
        return Path(self.models)


class StageRef(BaseModel):
    """What a stage task returns: where its outputs are, and the key they were made under."""

    item_id: str
    stage: str
    key: str
    frames: int


def stage_key(stage: str, params: dict[str, Any], upstream: list[StageRef] = ()) -> str:
    """Content key of a stage's result: its parameters and the keys of what it reads."""
    payload = {"stage": stage, "code": CODE_VERSION, "params": params,
               "upstream": sorted(ref.key for ref in upstream)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


FINGERPRINT_CACHE = ".freetalk-fingerprint.json"
"""File in a models folder that remembers each file's sha256 by (relative path, size,
modification time), so a file is hashed again only when it changes."""


MODEL_PARTS = ("sd15-inpainting", "ip-adapter", "image_encoder", "insightface", "eos")
"""The parts of the models folder that results depend on (fingerprinted in stage keys)."""


def models_fingerprint(models_dir: Path, component: str) -> str:
    """Content fingerprint of a model folder: the relative paths and sha256 of its files.

    The same files give the same fingerprint wherever the folder is (copied, moved, with new
    modification times); `FINGERPRINT_CACHE` only saves re-reading unchanged files."""
    root = Path(models_dir)
    folder = root / component
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    cache = _read_fingerprint_cache(root)
    changed = False
    entries = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = cache.get(relative)
        if not known or known.get("stamp") != stamp:
            known = cache[relative] = {"stamp": stamp, "sha256": sha256_file(path)}
            changed = True
        entries.append((path.relative_to(folder).as_posix(), known["sha256"]))
    if changed:
        _write_fingerprint_cache(root, cache)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _read_fingerprint_cache(root: Path) -> dict:
    try:
        return json.loads((root / FINGERPRINT_CACHE).read_text())
    except (OSError, ValueError):
        return {}


def _write_fingerprint_cache(root: Path, cache: dict) -> None:
    """Best effort (a read-only models folder is fine): written whole, then renamed."""
    tmp = root / f"{FINGERPRINT_CACHE}.{os.getpid()}.tmp"
    try:
        merged = {**_read_fingerprint_cache(root), **cache}
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, root / FINGERPRINT_CACHE)
    except OSError:
        tmp.unlink(missing_ok=True)


MASK_SCALE = 255
"""`face_crop/mouth_masks` (`arrays.MOUTH_MASKS`) are stored as uint8: weight = value / MASK_SCALE."""


def mask_weights(masks: np.ndarray) -> np.ndarray:
    """Stored `(..., H, W) uint8` mouth masks as `float32` weights in [0, 1]."""
    return np.asarray(masks, dtype=np.float32) / MASK_SCALE


def mask_values(weights: np.ndarray) -> np.ndarray:
    """`float` weights in [0, 1] as the stored `uint8` mouth masks."""
    return np.clip(np.rint(np.asarray(weights) * MASK_SCALE), 0, MASK_SCALE).astype(np.uint8)


def chunk_ranges(n_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """`[(start, stop), ...]` covering `0..n_frames` in order; the last chunk may be short."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    return [(s, min(s + chunk_frames, n_frames)) for s in range(0, n_frames, chunk_frames)]


@contextmanager
def recorded_chunk(store: Store, item_id: str, stage: str, chunk: int, key: str,
                   frames: int = 0) -> Iterator[dict[str, int]]:
    """Time a unit of work and record its stage row: done on success, failed (with the
    reason) on error. Only a done row makes the chunk's arrays count. The body may set
    `row["frames"]` once it knows how many frames it made."""
    row = {"frames": frames}
    start = time.perf_counter()
    try:
        yield row
    except BaseException as exc:
        store.record_stage(item_id, stage, chunk, "failed", seconds=time.perf_counter() - start,
                           frames=row["frames"], cache_key=key, error=one_line(exc))
        raise
    store.record_stage(item_id, stage, chunk, "done", seconds=time.perf_counter() - start,
                       frames=row["frames"], cache_key=key)


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class StageProgress:
    """Fan-out of per-stage progress: command-line bars subscribe here, and each update is
    mirrored into a Prefect progress artifact for the UI when running inside a flow."""

    def __init__(self):
        self._listeners: list = []
        self._artifacts: dict[tuple[str, str], Any] = {}

    def subscribe(self, listener) -> None:
        """`listener(item_id, stage, done, total)` is called on every update."""
        self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def update(self, item_id: str, stage: str, done: int, total: int) -> None:
        for listener in list(self._listeners):
            listener(item_id, stage, done, total)
        self._artifact(item_id, stage, 100.0 * done / max(total, 1))

    def _artifact(self, item_id: str, stage: str, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        key = (item_id, stage)
        if key not in self._artifacts:
            self._artifacts[key] = create_progress_artifact(
                percent, description=f"{stage} of {item_id}")
        else:
            update_progress_artifact(self._artifacts[key], percent)


progress = StageProgress()


_loaded_models: dict[tuple, Any] = {}
_model_loads: dict[str, int] = {}
_model_lock = threading.Lock()


def load_cached(kind: str, loader: Callable[[], Any], *, models: str | Path | None = None,
                components: tuple[str, ...] = (), device: str | None = None, dtype: Any = None) -> Any:
    """`loader()`'s model, loaded once per process and reused by every later item.

    Keyed by `kind`, the content fingerprint of `components` of the `models` folder, the device
    and the dtype, so changed checkpoints load again. Each load is counted (`model_loads`) and
    logged to the run's logs."""
    fingerprints = tuple(models_fingerprint(Path(models), c) for c in components) if models else ()
    key = (kind, str(Path(models).resolve()) if models else None, fingerprints, device, str(dtype))
    with _model_lock:
        if key not in _loaded_models:
            start = time.perf_counter()
            try:
                _loaded_models[key] = loader()
            except FreetalkError:
                raise
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint fails in the library reading it
                if not models or "out of memory" in str(exc).lower():
                    raise
                from freetalk_core.errors import ModelFileError

                where = ", ".join(str(Path(models) / c) for c in components) or str(models)
                raise ModelFileError(f"cannot load the {kind} from {where} ({one_line(exc)}); run "
                                     f"`freetalk models check {models}`, then `freetalk models download` "
                                     f"(or `freetalk models tiny` for tests)") from exc
            _model_loads[kind] = _model_loads.get(kind, 0) + 1
            run_logger().info("loaded %s on %s in %.1f s (load %d of %s in this worker)", kind,
                               device or "cpu", time.perf_counter() - start, _model_loads[kind], kind)
        return _loaded_models[key]


def model_loads() -> dict[str, int]:
    """How many times this process loaded each kind of model."""
    with _model_lock:
        return dict(_model_loads)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run; a plain module logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("freetalk")


FLOW_STEP = 1.0 / 64
"""Stored flow fields are int16 multiples of this (px): 1/64 px resolution, +-512 px range
(more than a crop). Quantised, the smooth fields compress far better than float16 (10x on the
sample pair, bench/store_scale.py); the Noise Sensor reads them back as float32 (`read_flows`)."""


def flow_values(flow_field: np.ndarray) -> np.ndarray:
    """`(..., 2)` float px -> the stored int16."""
    return np.clip(np.rint(np.asarray(flow_field) / FLOW_STEP), -32768, 32767).astype(np.int16)


def read_flows(array, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Stored flow fields `[start, stop)` as `(n, h, w, 2) float32` px."""
    return np.asarray(array[start:stop], dtype=np.float32) * np.float32(FLOW_STEP)


def load_fit(store: Store, item_id: str, role: str):
    """The stored `FitResult` of `role` ("identity" or "lip_ref"), one entry per output frame."""
    import dataclasses

    from freetalk_core.fit_3dmm import FitResult

    values = {}
    for field in dataclasses.fields(FitResult):
        value = store.read(item_id, arrays.FIT[role][field.name])
        values[field.name] = value.item() if value.ndim == 0 else value
    return FitResult(**values)
