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
"""

from __future__ import annotations

from freetalk_core.models.check import (  # noqa: F401 - the package's interface
    ModelEntry,
    check_arcface,
    check_evaluation_models,
    check_models,
    describe_evaluation_models,
    describe_models,
    format_description,
)
from freetalk_core.models.download import (  # noqa: F401 - the package's interface
    IMAGE_ENCODER_FILES,
    SD15_FILES,
    download_models,
)
from freetalk_core.models.layout import (  # noqa: F401 - the package's interface
    ARCFACE_CANDIDATES,
    BUFFALO_L_URLS,
    CLIP_VIT_H_CONFIG,
    DETECTOR_CANDIDATES,
    EOS_DIR,
    EOS_FILES,
    EOS_HINT,
    EVALUATION_DIR,
    EVALUATION_FILES,
    FACEID_FILES,
    FACEID_ID_DIM,
    FACEID_LORA_RANK,
    FACEID_NUM_TOKENS,
    FACEID_REPO,
    FACEID_RESAMPLER_DEPTH,
    FIX_HINT,
    IMAGE_ENCODER_DIR,
    IMAGE_ENCODER_REPO,
    IMAGE_ENCODER_SUBFOLDER,
    INSIGHTFACE_DIR,
    IP_ADAPTER_DIR,
    MANIFEST,
    MODEL_LAYOUT,
    REVISIONS,
    SCHEDULER_CONFIG,
    SD15_COMPONENTS,
    SD15_DIR,
    SD15_REPO,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    TINY_CLIP_VISION_CONFIG,
    TINY_FACEID_SCALE,
    TINY_LORA_RANK,
    TINY_SEED,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    arcface_path,
    check_faceid_state_dict,
    evaluation_path,
    faceid_image_proj_shapes,
    faceid_ip_adapter_shapes,
    faceid_path,
    insightface_detector_path,
    random_faceid_plus_state_dict,
    resolve_models_dir,
    unet_attention_processors,
)
from freetalk_core.models.tiny import (  # noqa: F401 - the package's interface
    link_eos,
    write_clip_image_processor,
    write_tiny_evaluation_models,
    write_tiny_models,
    write_tiny_scrfd,
    write_tiny_tokenizer,
)
