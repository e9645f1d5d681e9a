"""The `generate` flow: one (identity, lip reference) pair through the eight stages."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from flows.inputs import check_input
from freetalk_core import video
from freetalk_core.errors import FreetalkError, VideoReadError
from storage import Store, sha256_file
from storage.arrays import (
    CLIP_EMBED,
    CONTROLLER,
    DIFFUSION,
    FACE_CROP,
    FIT_3DMM,
    NOISE_FILTER,
    OPTICAL_FLOW,
    STRUCTURE_RENDER,
)
from tasks.chunks import FINISH
from tasks.clip_embed import clip_embed
from tasks.common import KEEP_CHOICES, ItemJob, StageRef, models_fingerprint, one_line, progress, stage_key
from tasks.controller import controller
from tasks.diffusion import diffusion
from tasks.face_crop import face_crop
from tasks.fit_3dmm import fit_3dmm
from tasks.noise_filter import noise_filter
from tasks.optical_flow import optical_flow
from tasks.structure_render import structure_render

STAGE_TASKS = {FACE_CROP: face_crop, FIT_3DMM: fit_3dmm, STRUCTURE_RENDER: structure_render,
               CLIP_EMBED: clip_embed, CONTROLLER: controller, DIFFUSION: diffusion,
               OPTICAL_FLOW: optical_flow, NOISE_FILTER: noise_filter}
"""The task of each stage, in the order they run."""

UPSTREAM = {
    FACE_CROP: [], FIT_3DMM: [FACE_CROP], STRUCTURE_RENDER: [FACE_CROP, FIT_3DMM],
    CLIP_EMBED: [FACE_CROP, STRUCTURE_RENDER], CONTROLLER: [FACE_CROP, CLIP_EMBED],
    DIFFUSION: [FACE_CROP, CLIP_EMBED, CONTROLLER],
    OPTICAL_FLOW: [FACE_CROP, STRUCTURE_RENDER, DIFFUSION],
    NOISE_FILTER: [FACE_CROP, DIFFUSION, OPTICAL_FLOW],
}
"""What each stage reads: its inputs, in call order, and the keys its own key is chained to."""


def make_job(identity: str | Path, lip_ref: str | Path, *, store: str | Path, models: str | Path,
             audio: str | Path | None = None, item_id: str | None = None,
             known_hashes: dict[str, str] | None = None, check: bool = True, fps: float | None = None,
             **settings) -> ItemJob:
    """Describe one pair: checks the inputs (`flows.inputs.check_input`, unless `check` is
    False because that was done before), resolves paths, hashes the inputs (or takes
    `known_hashes`, `{role}_sha256` as a store recorded them), names the item.

    `fps`: the output's frame rate; None keeps the identity video's (`output_fps`)."""
    paths = {"identity": identity, "lip_ref": lip_ref, "audio": audio}
    hashes = {}
    for role, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if check:
            check_input(role, path)
        elif not path.is_file():
            raise VideoReadError(f"{role} file not found: {path} (check the path)")
        paths[role] = str(path.resolve())
        known = (known_hashes or {}).get(f"{role}_sha256")
        hashes[f"{role}_sha256"] = known or sha256_file(path)
    if item_id is None:
        item_id = default_item_id(paths["identity"], paths["lip_ref"], hashes)
    if settings.get("keep", "all") not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {settings['keep']!r}")
    return ItemJob(store=str(Path(store).expanduser().resolve()), item_id=item_id,
                   models=str(Path(models).expanduser().resolve()), fps=output_fps(paths["identity"], fps),
                   **{k: v for k, v in paths.items() if v is not None}, **hashes, **settings)


def output_fps(identity: str | Path, fps: float | None = None) -> float:
    """The frame rate an item is made at: `fps` when given, else the identity video's own, so
    the output keeps the identity's timing (29.97 stays 30000/1001: `video.write_video`
    recovers the exact fraction). Both videos are read at it: the lip reference is resampled
    by timestamp, its motion and audio keep their times."""
    if fps is None:
        return video.probe(identity).fps
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return float(fps)


def default_item_id(identity: str, lip_ref: str, hashes: dict) -> str:
    """`<identity stem>__<lip stem>__<hash of the input files' sha256>`: the same inputs are
    the same item whatever the settings (a changed setting recomputes only the stages it
    affects, by their keys)."""
    digest = hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()[:10]
    stem = lambda p: re.sub(r"[^A-Za-z0-9_-]+", "-", Path(p).stem)[:40].strip("-") or "video"  # noqa: E731
    return f"{stem(identity)}__{stem(lip_ref)}__{digest}"


def stage_keys(job: ItemJob, fingerprints: dict[str, str] | None = None) -> dict[str, str]:
    """Every stage's key, chained so a change upstream reaches everything downstream.

    Keys hold what a stage's result depends on and nothing of where things are: input
    contents (sha256), model contents (`models_fingerprint`, or `fingerprints` of
    `MODEL_PARTS` computed once for many items), settings, and `chunk_frames` (the chunk
    ranges a stage row stands for), never the store's or the models' paths."""
    models = Path(job.models)
    known = fingerprints or {}
    fp = lambda *parts: [known.get(p) or models_fingerprint(models, p) for p in parts]  # noqa: E731
    params = {
        # The rate the item is made at (the identity's unless chosen): a new rate, new frames.
        FACE_CROP: {"identity": job.identity_sha256, "lip_ref": job.lip_ref_sha256,
                      "audio": job.audio_sha256, "fps": job.fps,
                      "face_index": job.face_index, "face_box": job.face_box, "detector": job.detector,
                      **({"detector_model": fp("insightface")} if job.detector != "dlib" else {})},
        FIT_3DMM: {"eos": fp("eos")},
        STRUCTURE_RENDER: {"eos": fp("eos")},
        CLIP_EMBED: {"models": fp("image_encoder", "insightface")},
        CONTROLLER: {"lambda_range": list(job.lambda_range)},
        DIFFUSION: {"models": fp("sd15-inpainting", "ip-adapter"), "steps": job.steps,
                      "guidance": job.guidance, "seed": job.seed, "ip": job.ip_adapter_scale,
                      "faceid": job.faceid_variant},
        OPTICAL_FLOW: {"reference": job.flow_reference},
        NOISE_FILTER: {"kernel_size": job.kernel_size, "window": job.noise_window,
                         "along_motion": job.filter_along_motion,
                         "audio": job.audio_sha256, "mark": job.mark, "label": job.label},
    }
    keys: dict[str, str] = {}
    for stage, p in params.items():
        refs = [StageRef(item_id=job.item_id, stage=u, key=keys[u], frames=0) for u in UPSTREAM[stage]]
        keys[stage] = stage_key(stage, {**p, "chunk_frames": job.chunk_frames}, refs)
    return keys


def finished_before(store: Store, job: ItemJob, keys: dict[str, str]) -> bool:
    """The item's output exists and its last stage's last unit is done under today's key.
    The keys chain, so that key stands for every stage's inputs and settings: nothing needs
    to run, even when `keep="final"` dropped the intermediate arrays."""
    return (store.output_path(job.item_id).exists()
            and FINISH in store.done_chunks(job.item_id, NOISE_FILTER, keys[NOISE_FILTER]))


@flow(name="generate", flow_run_name="generate[{job.item_id}]", log_prints=True)
def generate(job: ItemJob) -> str:
    """Identity video + lip reference -> the identity speaking with the lip motion (MP4).

    Returns the path of the output in the store.
    """
    store = Store(job.store)
    keys = stage_keys(job)
    if finished_before(store, job, keys):
        return str(store.output_path(job.item_id))
    begin_item(store, job)
    try:
        refs = run_stages(job, keys, STAGE_TASKS)
    except Exception as exc:
        store.record_item(job.item_id, "failed", error=one_line(exc))
        if not isinstance(exc, FreetalkError):
            get_run_logger().exception("item %s failed", job.item_id)
        raise
    return complete_item(store, job, refs)


def run_stages(job: ItemJob, keys: dict[str, str], stages, refs: dict[str, StageRef] | None = None
               ) -> dict[str, StageRef]:
    """Run `stages` (names, in order) of one item as Prefect tasks named `stage[item_id]`;
    `refs` holds the results of stages run before. Returns every stage's reference."""
    refs = dict(refs or {})
    for stage in stages:
        task = STAGE_TASKS[stage].with_options(task_run_name=f"{stage}[{job.item_id}]")
        refs[stage] = mark_stage_complete(task(job, keys[stage], *(refs[u] for u in UPSTREAM[stage])))
    return refs


def begin_item(store: Store, job: ItemJob, **fields) -> None:
    """Record the item as running, with its inputs."""
    store.record_item(job.item_id, "running", identity=job.identity, lip_ref=job.lip_ref,
                      audio=job.audio, identity_sha256=job.identity_sha256,
                      lip_ref_sha256=job.lip_ref_sha256, audio_sha256=job.audio_sha256,
                      fps=job.fps, **fields)


def complete_item(store: Store, job: ItemJob, refs: dict[str, StageRef], **fields) -> str:
    """Record the item done with its output. Returns the output's path in the store."""
    output = store.output_path(job.item_id)
    attrs = store.attrs(job.item_id, NOISE_FILTER)
    store.record_item(job.item_id, "done", n_frames=refs[FACE_CROP].frames, output=str(output),
                      output_sha256=attrs["output_sha256"], watermark_id=attrs.get("watermark_id"),
                      output_key=refs[NOISE_FILTER].key, **fields)
    if job.keep == "final":
        store.drop_intermediates(job.item_id)
    return str(output)


def mark_stage_complete(ref: StageRef) -> StageRef:
    """Show the stage `ref` stands for as complete in the progress bars; returns `ref`."""
    progress.update(ref.item_id, ref.stage, 1, 1)
    return ref


def generate_to(job: ItemJob, out: str | Path) -> Path:
    """Run `generate` and copy the store's output to `out`."""
    produced = Path(generate(job))
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out != produced:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(produced, tmp)
        tmp.replace(out)
    return out


@flow(name="generate-pair")
def generate_pair(identity: str, lip_ref: str, out: str, store: str, models: str,
                  audio: str | None = None, steps: int = 20, guidance: float = 7.5,
                  seed: int = 42, batch_size: int | None = None, device: str = "auto",
                  kernel_size: int = 5, flow_reference: str = "structure", filter_along_motion: bool = True,
                  noise_window: int = 100, faceid_variant: str = "plus", ip_adapter_scale: float = 1.0,
                  lambda_range: tuple[float, float] = (0.5, 2.0), face_index: int = 0,
                  face_box: tuple[float, float, float, float] | None = None, detector: str = "dlib",
                  fps: float | None = None) -> str:
    """Deployment entry point: plain parameters in, the output path out."""
    job = make_job(identity, lip_ref, audio=audio, store=store, models=models, steps=steps,
                   guidance=guidance, seed=seed, batch_size=batch_size, device=device,
                   kernel_size=kernel_size, flow_reference=flow_reference,
                   filter_along_motion=filter_along_motion, noise_window=noise_window,
                   faceid_variant=faceid_variant, ip_adapter_scale=ip_adapter_scale,
                   lambda_range=tuple(lambda_range), face_index=face_index,
                   face_box=None if face_box is None else tuple(face_box), detector=detector, fps=fps)
    return str(generate_to(job, out))
