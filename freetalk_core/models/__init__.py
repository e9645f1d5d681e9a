"""The models directory: what goes where, how to check it, tiny stand-ins and the real download.

Layout (ARCHITECTURE.md, "Models directory")::

    MODELS/sd15-inpainting/   diffusers StableDiffusionInpaintPipeline folder (9-channel U-Net)
    MODELS/ip-adapter/        ip-adapter-faceid-plus_sd15.bin and/or ip-adapter-faceid-plusv2_sd15.bin
    MODELS/image_encoder/     CLIPVisionModelWithProjection (ViT-H/14: 257 x 1280 hidden states)
    MODELS/insightface/       w600k_r50.onnx (ArcFace of the buffalo_l pack), or models/buffalo_l/...
    MODELS/eos/               the Surrey Face Model files
    MODELS/evaluation/        optional: the networks of `freetalk evaluate` (EVALUATION_FILES)

`write_tiny_models` fills such a directory with random weights of tiny width in exactly these
on-disk formats, so the loaders that read the real checkpoints read the tiny ones unchanged.

Submodules: `layout` (what goes where, full-size and tiny configurations, FaceID key rules),
`check`, `tiny` (the tiny writers), `download`.
"""

from __future__ import annotations

from freetalk_core.models.check import (
    ModelEntry,
    check_evaluation_models,
    check_models,
    describe_evaluation_models,
    describe_models,
    format_description,
)
from freetalk_core.models.download import download_models
from freetalk_core.models.layout import (
    arcface_path,
    faceid_path,
    insightface_detector_path,
    resolve_models_dir,
)
from freetalk_core.models.tiny import write_tiny_evaluation_models, write_tiny_models, write_tiny_scrfd

__all__ = ["ModelEntry", "arcface_path", "check_evaluation_models", "check_models", "describe_evaluation_models",
           "describe_models", "download_models", "faceid_path", "format_description", "insightface_detector_path",
           "resolve_models_dir", "write_tiny_evaluation_models", "write_tiny_models", "write_tiny_scrfd"]
