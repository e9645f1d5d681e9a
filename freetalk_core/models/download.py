"""The real checkpoints from the Hugging Face hub and insightface's release, verified by checksum
(`freetalk models download`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from freetalk_core.errors import ModelFileError
from freetalk_core.models.check import check_arcface, check_models
from freetalk_core.models.layout import (
    BUFFALO_L_URLS,
    EOS_DIR,
    FACEID_FILES,
    FACEID_REPO,
    IMAGE_ENCODER_DIR,
    IMAGE_ENCODER_REPO,
    IMAGE_ENCODER_SUBFOLDER,
    INSIGHTFACE_DIR,
    MANIFEST,
    REVISIONS,
    SD15_DIR,
    SD15_REPO,
    faceid_path,
)
from freetalk_core.models.tiny import link_eos, write_clip_image_processor

# ---------------------------------------------------------------------------------------------
# Download (needs internet)


SD15_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "text_encoder/config.json",
    "text_encoder/model{variant}.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model{variant}.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model{variant}.safetensors",
)
IMAGE_ENCODER_FILES = ("config.json", "model.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """Git's object id of a file (what the hub lists for files not stored in LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, info) -> str | None:
    """None when `path` matches the hub's record (size, and sha256 for LFS files or the git blob
    id otherwise), else what differs."""
    if path.stat().st_size != info.size:
        return f"{path.stat().st_size} bytes, the hub says {info.size}"
    if info.lfs is not None:
        sha = _sha256(path)
        return None if sha == info.lfs.sha256 else f"sha256 {sha} differs from the hub's {info.lfs.sha256}"
    oid = _git_blob_sha1(path)
    return None if oid == info.blob_id else f"git blob id {oid} differs from the hub's {info.blob_id}"


def _fetch(api, repo: str, filename: str, commit: str, target: Path, staging: Path, log) -> dict:
    """Download one file of a Hugging Face repo at a commit into `target`, verified against the
    hub's checksums. Already-verified files are kept; an interrupted download resumes from its
    partial file in `staging`."""
    from huggingface_hub import hf_hub_download

    info = next(iter(api.get_paths_info(repo, [filename], revision=commit)))
    if target.is_file() and _verify(target, info) is None:
        log(f"ok    {target}")
    else:
        log(f"get   {repo}@{commit[:10]} {filename} -> {target}")
        path = Path(hf_hub_download(repo, filename, revision=commit, local_dir=staging / repo.replace("/", "--")))
        problem = _verify(path, info)
        if problem is not None:
            path.unlink()
            raise ModelFileError(f"{repo}/{filename}: {problem}; re-run `freetalk models download`")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return {"repo": repo, "file": filename, "commit": commit, "size": info.size,
            "sha256": info.lfs.sha256 if info.lfs is not None else _sha256(target)}


def download_models(
    models_dir: str | os.PathLike,
    eos_source: str | os.PathLike | None = None,
    variant: str | None = None,
    faceid_variants: tuple[str, ...] = ("plus", "plusv2"),
    log=print,
) -> Path:
    """Download the real checkpoints into `models_dir` (needs internet).

    Each Hugging Face repository is resolved to one commit (`REVISIONS`, pinned through the
    FREETALK_*_REVISION variables), every file is verified against the hub's sha256, and
    the commits and hashes are written to MODELS/manifest.json. An interrupted run resumes.
    `variant="fp16"` fetches the half-precision SD weights (GPU only). The buffalo_l pack
    comes from insightface's GitHub release; its ArcFace ONNX is kept and checked to load.
    """
    from huggingface_hub import HfApi

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    api = HfApi()
    suffix = f".{variant}" if variant else ""
    staging = models_dir / ".download"
    commits = {repo: api.model_info(repo, revision=rev).sha for repo, rev in REVISIONS.items()}
    records = []
    for name in SD15_FILES:
        filename = name.format(variant=suffix)
        records.append(_fetch(api, SD15_REPO, filename, commits[SD15_REPO], models_dir / SD15_DIR / filename,
                              staging, log))
    for name in IMAGE_ENCODER_FILES:
        records.append(_fetch(api, IMAGE_ENCODER_REPO, f"{IMAGE_ENCODER_SUBFOLDER}/{name}",
                              commits[IMAGE_ENCODER_REPO], models_dir / IMAGE_ENCODER_DIR / name, staging, log))
    write_clip_image_processor(models_dir / IMAGE_ENCODER_DIR)
    for v in faceid_variants:
        records.append(_fetch(api, FACEID_REPO, FACEID_FILES[v], commits[FACEID_REPO], faceid_path(models_dir, v),
                              staging, log))
    records.append(_download_arcface(models_dir / INSIGHTFACE_DIR, log))
    try:
        link_eos(models_dir / EOS_DIR, eos_source)
    except ModelFileError as error:
        log(str(error))
    manifest = {"commits": commits, "files": records}
    (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(staging, ignore_errors=True)
    problems = check_models(models_dir, faceid_variant=faceid_variants[0])
    for problem in problems:
        log(f"check: {problem}")
    if problems:
        raise ModelFileError(f"downloaded into {models_dir}, but {len(problems)} check"
                             f"{'s' if len(problems) > 1 else ''} failed: {problems[0]}")
    return models_dir


def _download_arcface(folder: Path, log) -> dict:
    """buffalo_l.zip from insightface's GitHub release (resumable with HTTP Range), keeping its
    ArcFace ONNX, which must then load with ArcFace's interface. GitHub publishes no checksum for
    the pack: its sha256 and the ONNX's are recorded in the manifest."""
    import urllib.error
    import urllib.request
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "w600k_r50.onnx"
    archive = folder / "buffalo_l.zip"
    archive_sha = None
    url = None
    if not target.is_file():
        part = archive.with_name(archive.name + ".part")
        for url in BUFFALO_L_URLS:
            done = part.stat().st_size if part.exists() else 0
            request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
            log(f"get   {url} -> {archive}")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    mode = "ab" if done and response.status == 206 else "wb"
                    with open(part, mode) as f:
                        shutil.copyfileobj(response, f, 1 << 20)
                break
            except urllib.error.HTTPError as error:
                if error.code == 416:  # already complete
                    break
                log(f"      {error}")
        else:
            raise ModelFileError(f"could not download buffalo_l.zip from {', '.join(BUFFALO_L_URLS)}")
        os.replace(part, archive)
        archive_sha = _sha256(archive)
        with zipfile.ZipFile(archive) as zf:
            member = next((n for n in zf.namelist() if n.endswith("w600k_r50.onnx")), None)
            if member is None:
                raise ModelFileError(f"{archive} holds no w600k_r50.onnx; delete it and re-run the download")
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(target.with_suffix(".part"), target)
        archive.unlink()
    problems = check_arcface(target, folder.parent)
    if problems:
        raise ModelFileError(problems[0])
    return {"url": url, "archive_sha256": archive_sha, "file": "w600k_r50.onnx", "sha256": _sha256(target)}
