"""CLIP embed (METHOD.md step 4): structure embeddings, the negative embedding, the identity embedding.

- Structure embedding `e_t`: the CLIP ViT-H/14 image encoder's penultimate hidden states of a
  structure frame (face-aligned crop, CLIP preprocessing), `(257, 1280)` (class token +
  16 x 16 patch tokens).
- Negative embedding: the same encoder's output for an all-zero image.
- Identity embedding `z`: the mean of the L2-normalised ArcFace embeddings of identity crops
  (the pipeline takes an evenly spread sample of the frames with a face, `tasks.clip_embed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freetalk_core.errors import ModelFileError, NoFaceError
from freetalk_core.models.layout import (
    FIX_HINT,
    IMAGE_ENCODER_DIR,
    IMAGE_ENCODER_REPO,
    IMAGE_ENCODER_SUBFOLDER,
    arcface_path,
)

ENCODE_BATCH = 16
"""Frames per image-encoder forward pass."""

FIVE_POINT_GROUPS = (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,))
"""iBUG-68 (0-based) points averaged into ArcFace's five keypoints, in insightface's order: eye
on the image's left, eye on the image's right, nose tip, left and right mouth corners."""


@dataclass
class ImageEncoder:
    """The CLIP image encoder and its preprocessing."""

    model: torch.nn.Module
    processor: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_image_encoder(models_dir, device="cpu", dtype=torch.float32) -> ImageEncoder:
    """CLIPVisionModelWithProjection from MODELS/image_encoder, else from the Hugging Face cache
    (h94/IP-Adapter, models/image_encoder). Never downloads.

    Raises ModelFileError when neither is there.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = Path(models_dir) / IMAGE_ENCODER_DIR if models_dir is not None else None
    if folder is not None and (folder / "config.json").is_file():
        model = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    else:
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                IMAGE_ENCODER_REPO, subfolder=IMAGE_ENCODER_SUBFOLDER,
                dtype=dtype, local_files_only=True,
            )
        except OSError as error:
            raise ModelFileError(
                f"missing {folder}/config.json (and no {IMAGE_ENCODER_REPO} image encoder in the "
                f"Hugging Face cache): {FIX_HINT}"
            ) from error
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder)
    else:
        size = model.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    return ImageEncoder(model.to(device).eval(), processor)


@torch.no_grad()
def _penultimate_hidden_states(encoder: ImageEncoder, pixel_values: torch.Tensor) -> np.ndarray:
    pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
    hidden = encoder.model(pixel_values, output_hidden_states=True).hidden_states[-2]
    return hidden.float().cpu().numpy()


def structure_embeddings(encoder: ImageEncoder, frames: np.ndarray, batch_size: int = ENCODE_BATCH) -> np.ndarray:
    """Penultimate hidden states of the image encoder for every structure frame.

    Args:
        encoder: from `load_image_encoder`.
        frames: `(T, H, W, 3)` uint8 RGB structure frames (face-aligned crops, 512 x 512).

    Returns:
        `(T, 257, D)` float32 (`D` = 1280 for ViT-H).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = []
    for start in range(0, len(frames), batch_size):
        batch = list(frames[start : start + batch_size])
        pixel_values = encoder.processor(images=batch, return_tensors="pt").pixel_values
        out.append(_penultimate_hidden_states(encoder, pixel_values))
    hidden = encoder.model.config.hidden_size
    return np.concatenate(out, axis=0) if out else np.zeros((0, 257, hidden), np.float32)


def negative_embedding(encoder: ImageEncoder) -> np.ndarray:
    """The encoder's penultimate hidden states for an all-zero image: `(257, D)` float32.

    "All-zero" is the encoder's input tensor, i.e. after CLIP normalisation, as IP-Adapter's
    training drops the image prompt and as diffusers' `encode_image` computes the negative; the
    FaceID-Plus weights learnt their unconditional branch from exactly this input.
    """
    size = encoder.model.config.image_size
    zeros = torch.zeros(1, 3, size, size)
    return _penultimate_hidden_states(encoder, zeros)[0]


def load_arcface(models_dir):
    """insightface's ArcFaceONNX for MODELS/insightface/w600k_r50.onnx (or the buffalo_l pack), CPU.

    Raises ModelFileError when the file is absent.
    """
    from insightface.model_zoo import get_model

    path = arcface_path(models_dir)
    providers = ["CPUExecutionProvider"]
    if os.environ.get("FREETALK_ARCFACE_CUDA") == "1":
        providers.insert(0, "CUDAExecutionProvider")
    model = get_model(str(path), providers=providers)
    if model is None or getattr(model, "taskname", None) != "recognition":
        raise ModelFileError(f"{path} is not an ArcFace recognition model (input (N, 3, 112, 112)): {FIX_HINT}")
    return model


def five_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """ArcFace's five keypoints from iBUG-68 landmarks.

    Args:
        landmarks: `(..., 68, 2)` float pixels.

    Returns:
        `(..., 5, 2)` float32: eye centres, nose tip, mouth corners.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape[-2:] != (68, 2):
        raise ValueError(f"landmarks must be (..., 68, 2), got {landmarks.shape}")
    return np.stack([landmarks[..., list(group), :].mean(axis=-2) for group in FIVE_POINT_GROUPS], axis=-2)


def face_embeddings(arcface, crops: np.ndarray, landmarks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalised ArcFace embedding of each crop.

    Args:
        arcface: from `load_arcface`.
        crops: `(T, H, W, 3)` uint8 RGB face crops.
        landmarks: `(T, 68, 2)` float32 iBUG-68 points in crop pixels; frames whose landmarks
            are not finite (no face) get a NaN row.

    Returns:
        `(T, 512)` float64.
    """
    from insightface.utils import face_align

    crops = np.asarray(crops)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be (T, H, W, 3) uint8, got {crops.shape} {crops.dtype}")
    if landmarks.shape != (len(crops), 68, 2):
        raise ValueError(f"landmarks must be ({len(crops)}, 68, 2), got {landmarks.shape}")
    usable = np.isfinite(landmarks).all(axis=(1, 2))
    if not usable.any():
        return np.full((len(crops), 512), np.nan)  # ArcFace's embedding width
    keypoints = five_keypoints(landmarks[usable])
    size = arcface.input_size[0]
    # insightface works on BGR images (its blob step swaps back to RGB)
    aligned = [face_align.norm_crop(np.ascontiguousarray(crop[..., ::-1]), kps, image_size=size)
               for crop, kps in zip(crops[usable], keypoints)]
    embeddings = np.concatenate(
        [arcface.get_feat(aligned[start : start + batch_size]) for start in range(0, len(aligned), batch_size)]
    ).astype(np.float64)
    out = np.full((len(crops), embeddings.shape[1]), np.nan)
    out[usable] = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return out


def identity_embedding(arcface, crops: np.ndarray, landmarks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Mean of the L2-normalised ArcFace embeddings of the identity crops (`face_embeddings`;
    frames without landmarks left out).

    Returns:
        `(512,)` float32 (not renormalised: the mean of unit vectors, as METHOD.md states).
    """
    embeddings = face_embeddings(arcface, crops, landmarks, batch_size)
    usable = np.isfinite(embeddings).all(axis=1)
    if not usable.any():
        raise NoFaceError("no identity frame has landmarks: cannot compute the identity embedding")
    return embeddings[usable].mean(axis=0).astype(np.float32)


def embedding_follows_lips(embeddings: np.ndarray, lip_landmarks: np.ndarray) -> float:
    """How closely the structure embedding follows the lip motion: the Pearson correlation,
    over frames, between the patch tokens' distance from the anchor frame's (`||e_t - e_a||`,
    the class token left out as the controller leaves it) and the lip opening's change from
    the anchor (`h_t - h_a`); the anchor and `h_t` as the controller defines them
    (`freetalk_core.lips`). NaN where either does not vary.

    Args:
        embeddings: `(T, 257, D)` structure embeddings.
        lip_landmarks: `(T, 68, 2)` the lip reference's crop landmarks.
    """
    from freetalk_core.lips import closed_mouth_index, lip_distance

    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 3 or len(embeddings) != len(lip_landmarks):
        raise ValueError(f"embeddings must be (T, 257, D) with T = {len(lip_landmarks)}, got {embeddings.shape}")
    anchor = closed_mouth_index(lip_landmarks)
    patches = embeddings[:, 1:].reshape(len(embeddings), -1)
    distance = np.linalg.norm(patches - patches[anchor], axis=1)
    opening = lip_distance(lip_landmarks)
    opening = opening - opening[anchor]
    if distance.std() == 0 or opening.std() == 0:
        return float("nan")
    return float(np.corrcoef(distance, opening)[0, 1])
