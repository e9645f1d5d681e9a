"""What is in a models folder and what is wrong with it (`freetalk models check`)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from freetalk_core.errors import ModelFileError
from freetalk_core.models.layout import (
    ARCFACE_CANDIDATES,
    CLIP_VIT_H_CONFIG,
    EOS_DIR,
    EOS_FILES,
    EOS_HINT,
    EVALUATION_DIR,
    EVALUATION_FILES,
    FIX_HINT,
    IMAGE_ENCODER_DIR,
    INSIGHTFACE_DIR,
    IP_ADAPTER_DIR,
    MODEL_LAYOUT,
    SD15_COMPONENTS,
    SD15_DIR,
    SD15_REPO,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    arcface_path,
    check_faceid_state_dict,
    faceid_path,
)

# ---------------------------------------------------------------------------------------------
# Checking


@dataclass
class ModelEntry:
    path: str
    what: str
    present: bool
    optional: bool = False


def describe_models(models_dir: str | os.PathLike) -> list[ModelEntry]:
    """Which entries of MODEL_LAYOUT are present in `models_dir` (presence only; see check_models)."""
    models_dir = Path(models_dir)
    entries = []
    for rel, what in MODEL_LAYOUT.items():
        path = models_dir / rel
        if rel.startswith(INSIGHTFACE_DIR):
            present = any((models_dir / INSIGHTFACE_DIR / c).is_file() for c in ARCFACE_CANDIDATES)
        elif rel.endswith("/"):
            present = path.is_dir() and any(path.iterdir())
        else:
            present = path.is_file()
        entries.append(ModelEntry(rel, what, present))
    v2 = faceid_path(models_dir, "plusv2")
    if v2.is_file():
        entries.append(ModelEntry(f"{IP_ADAPTER_DIR}/{v2.name}", "IP-Adapter-FaceID-PlusV2 (optional)", True))
    return entries


def describe_evaluation_models(models_dir: str | os.PathLike) -> list[ModelEntry]:
    """The optional networks of `freetalk evaluate` (EVALUATION_FILES) and which are present."""
    models_dir = Path(models_dir)
    return [ModelEntry(f"{EVALUATION_DIR}/{entry['file']}", f"{entry['metric']}: {entry['what']}",
                       (models_dir / EVALUATION_DIR / entry["file"]).is_file(), optional=True)
            for entry in EVALUATION_FILES.values()]


def check_evaluation_models(models_dir: str | os.PathLike) -> list[str]:
    """Problems of the evaluation networks that are present (absent ones are optional: none)."""
    from freetalk_core.evaluation.networks import check_evaluation_file

    return [problem for role in EVALUATION_FILES for problem in check_evaluation_file(models_dir, role)]


def _weights_file(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; raises ValueError when the file is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: {size} bytes, the header says {8 + n + end}")
    return header


def _read_json(path: Path, problems: list[str], label: str) -> dict | None:
    if not path.is_file():
        problems.append(f"missing {label}: {FIX_HINT}")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{label}: unreadable JSON ({error}); re-run the download")
        return None


def _check_weights(folder: Path, rel: str, problems: list[str]) -> None:
    weights = _weights_file(folder)
    if weights is None:
        problems.append(f"missing {rel}/ weights (no *.safetensors or *.bin): {FIX_HINT}")
        return
    if weights.suffix == ".safetensors":
        try:
            _safetensors_header(weights)
        except (OSError, ValueError) as error:
            problems.append(f"{rel}/{weights.name}: unreadable safetensors ({error}); re-run the download")


def check_models(models_dir: str | os.PathLike, faceid_variant: str = "plus") -> list[str]:
    """Everything wrong with `models_dir`, one line per problem (empty list: usable).

    Checks presence of every file, that weights files are complete, that the U-Net has 9 input
    channels, that the FaceID-Plus file has the real key set with shapes matching this U-Net and
    this image encoder, and that the ArcFace ONNX loads with a 112x112 input and a 512 output.
    The optional evaluation networks may be absent; one that is present must be usable.
    """
    import torch

    models_dir = Path(models_dir)
    problems: list[str] = []
    if not models_dir.is_dir():
        return [f"models directory {models_dir} does not exist: {FIX_HINT}"]

    sd = models_dir / SD15_DIR
    _read_json(sd / "model_index.json", problems, f"{SD15_DIR}/model_index.json")
    unet_config = _read_json(sd / "unet" / "config.json", problems, f"{SD15_DIR}/unet/config.json")
    for component in SD15_COMPONENTS:
        folder = sd / component
        rel = f"{SD15_DIR}/{component}"
        if component == "tokenizer":
            for name in ("vocab.json", "merges.txt"):
                if not (folder / name).is_file():
                    problems.append(f"missing {rel}/{name}: {FIX_HINT}")
        elif component == "scheduler":
            _read_json(folder / "scheduler_config.json", problems, f"{rel}/scheduler_config.json")
        else:
            if component != "unet":
                _read_json(folder / "config.json", problems, f"{rel}/config.json")
            _check_weights(folder, rel, problems)
    if unet_config is not None and unet_config.get("in_channels") != 9:
        problems.append(
            f"{SD15_DIR}/unet: {unet_config.get('in_channels')} input channels, an inpainting U-Net has 9 "
            f"(use {SD15_REPO})"
        )

    encoder_config = _read_json(models_dir / IMAGE_ENCODER_DIR / "config.json", problems, f"{IMAGE_ENCODER_DIR}/config.json")
    _check_weights(models_dir / IMAGE_ENCODER_DIR, IMAGE_ENCODER_DIR, problems)
    clip_hidden = None
    if encoder_config is not None:
        vision = encoder_config.get("vision_config", encoder_config)
        clip_hidden = vision.get("hidden_size")
        image, patch = vision.get("image_size"), vision.get("patch_size")
        if image and patch and (image // patch) ** 2 + 1 != 257:
            problems.append(f"{IMAGE_ENCODER_DIR}: {image}px / patch {patch} gives {(image // patch) ** 2 + 1} tokens, expected 257")

    faceid = faceid_path(models_dir, faceid_variant)
    rel = f"{IP_ADAPTER_DIR}/{faceid.name}"
    if not faceid.is_file():
        problems.append(f"missing {rel}: {FIX_HINT}")
    else:
        try:
            state_dict = torch.load(faceid, map_location="cpu", weights_only=True)
        except Exception as error:  # a cut-short zip or pickle raises several different types
            problems.append(f"{rel}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                            "the file is truncated or corrupt, re-run the download")
        else:
            if unet_config is not None:
                problems += check_faceid_state_dict(state_dict, unet_config, clip_hidden, rel)

    try:
        onnx_path = arcface_path(models_dir)
    except ModelFileError as error:
        problems.append(str(error))
    else:
        problems += check_arcface(onnx_path, models_dir)

    eos = models_dir / EOS_DIR
    for name in EOS_FILES.values():
        if not (eos / name).is_file():
            problems.append(f"missing {EOS_DIR}/{name}: {EOS_HINT}")
    return problems + check_evaluation_models(models_dir)


def check_arcface(path: Path, models_dir: Path) -> list[str]:
    import onnxruntime

    rel = path.relative_to(models_dir)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped failures for bad files
        return [f"{rel}: unreadable ONNX ({str(error).splitlines()[0][:120]}); re-run the download"]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, 112, 112]:
        return [f"{rel}: input shape {inputs[0].shape if inputs else None}, an ArcFace model takes (N, 3, 112, 112)"]
    if len(outputs) != 1 or outputs[0].shape[-1] != 512:
        return [f"{rel}: output shape {outputs[0].shape if outputs else None}, an ArcFace model gives 512 values"]
    return []


def format_description(models_dir: str | os.PathLike) -> str:
    """describe_models and describe_evaluation_models as text, one line per entry."""
    lines = [f"models directory: {models_dir}"]
    for entry in describe_models(models_dir):
        lines.append(f"  [{'ok' if entry.present else '--'}] {entry.path:48s} {entry.what}")
    lines.append("optional networks of `freetalk evaluate` (generation does not need them):")
    for entry in describe_evaluation_models(models_dir):
        state = "ok" if entry.present else "--"
        lines.append(f"  [{state}] {entry.path:48s} {entry.what}{'' if entry.present else ' (missing, optional)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Full size or tiny

FULL_SIZE_CONFIG = {
    f"{SD15_DIR}/unet": ("block_out_channels", list(SD15_UNET_CONFIG["block_out_channels"])),
    f"{SD15_DIR}/vae": ("block_out_channels", list(SD15_VAE_CONFIG["block_out_channels"])),
    f"{SD15_DIR}/text_encoder": ("hidden_size", SD15_TEXT_CONFIG["hidden_size"]),
    IMAGE_ENCODER_DIR: ("hidden_size", CLIP_VIT_H_CONFIG["hidden_size"]),
}
"""Folders whose config.json tells a full-size model from a tiny one: (key, full-size value)."""
FULL_SIZE_MIN_BYTES = {"ip-adapter": 100_000_000, "insightface": 100_000_000, "inception": 50_000_000,
                       "i3d": 25_000_000, "alexnet": 100_000_000, "syncnet": 25_000_000}
"""Single-file checkpoints: the least size of the real file (FaceID-Plus ~156 MB, ArcFace
w600k_r50 ~174 MB, Inception ~95 MB, I3D ~51 MB, AlexNet ~244 MB, SyncNet ~54 MB; their tiny
stand-ins are a few MB at most)."""


def model_sizes(models_dir: str | os.PathLike, faceid_variant: str = "plus") -> list[dict]:
    """Each model the product runs: `{"part", "path", "full_size"}`, `full_size` True for the
    real architecture, False for a tiny stand-in (its outputs mean nothing), None where absent."""
    models_dir = Path(models_dir)
    parts = []
    for rel, (key, value) in FULL_SIZE_CONFIG.items():
        config = models_dir / rel / "config.json"
        try:
            full = json.loads(config.read_text()).get(key) == value
        except (OSError, ValueError):
            full = None
        parts.append({"part": rel, "path": str(config.parent), "full_size": full})
    for part, path in (("ip-adapter", faceid_path(models_dir, faceid_variant)),
                       ("insightface", _present(lambda: arcface_path(models_dir)))):
        full = path.stat().st_size >= FULL_SIZE_MIN_BYTES[part] if path is not None and path.is_file() else None
        parts.append({"part": part, "path": str(path) if path else "", "full_size": full})
    for role, entry in EVALUATION_FILES.items():
        path = models_dir / EVALUATION_DIR / entry["file"]
        if path.is_file():  # optional: listed only where present
            full = path.stat().st_size >= FULL_SIZE_MIN_BYTES[role] if role in FULL_SIZE_MIN_BYTES else None
            parts.append({"part": f"{EVALUATION_DIR}/{entry['file']}", "path": str(path), "full_size": full})
    return parts


def _present(locate) -> Path | None:
    try:
        return locate()
    except ModelFileError:
        return None
