"""The models folder's layout: directories, file names, full-size configurations, the FaceID
file's key rules, where each checkpoint lives."""

from __future__ import annotations

import os
from pathlib import Path

from freetalk_core.errors import ModelFileError

SD15_DIR = "sd15-inpainting"
IP_ADAPTER_DIR = "ip-adapter"
IMAGE_ENCODER_DIR = "image_encoder"
INSIGHTFACE_DIR = "insightface"
EOS_DIR = "eos"
EVALUATION_DIR = "evaluation"

FACEID_FILES = {
    "plus": "ip-adapter-faceid-plus_sd15.bin",
    "plusv2": "ip-adapter-faceid-plusv2_sd15.bin",
}
"""FaceID-Plus variants: file name in MODELS/ip-adapter. v2 turns the projection shortcut on."""

ARCFACE_CANDIDATES = ("w600k_r50.onnx", "models/buffalo_l/w600k_r50.onnx", "buffalo_l/w600k_r50.onnx")
"""Where MODELS/insightface may hold the ArcFace ONNX: bare, or inside an unpacked buffalo_l pack."""

DETECTOR_CANDIDATES = ("det_10g.onnx", "models/buffalo_l/det_10g.onnx", "buffalo_l/det_10g.onnx")
"""Where MODELS/insightface may hold the buffalo_l pack's SCRFD face detector (`--detector
insightface`; not needed with the default dlib detector)."""

EOS_FILES = {
    "shape": "sfm_shape_3448.bin",
    "blendshapes": "expression_blendshapes_3448.bin",
    "mapper": "ibug_to_sfm.txt",
    "edge_topology": "sfm_3448_edge_topology.json",
    "contours": "sfm_model_contours.json",
}
"""The eos model files in MODELS/eos, by the role `fit_3dmm.load_face_model` reads them for."""

SD15_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

MODEL_LAYOUT = {
    f"{SD15_DIR}/model_index.json": "diffusers pipeline index (StableDiffusionInpaintPipeline)",
    f"{SD15_DIR}/unet/": "UNet2DConditionModel, 9 input channels (config.json + weights)",
    f"{SD15_DIR}/vae/": "AutoencoderKL (config.json + weights)",
    f"{SD15_DIR}/text_encoder/": "CLIPTextModel (config.json + weights)",
    f"{SD15_DIR}/tokenizer/": "CLIPTokenizer (vocab.json, merges.txt)",
    f"{SD15_DIR}/scheduler/": "scheduler_config.json",
    f"{IP_ADAPTER_DIR}/{FACEID_FILES['plus']}": "IP-Adapter-FaceID-Plus, original format (image_proj + ip_adapter)",
    f"{IMAGE_ENCODER_DIR}/": "CLIPVisionModelWithProjection (config.json + weights)",
    f"{INSIGHTFACE_DIR}/w600k_r50.onnx": "ArcFace recognition ONNX (buffalo_l)",
    **{f"{EOS_DIR}/{name}": "Surrey Face Model (eos)" for name in EOS_FILES.values()},
}
"""Every file or folder the product reads, relative to the models directory, and what it is."""

EVALUATION_FILES = {role: dict(file=file, what=what, metric=metric, url=url) for role, metric, file, what, url in [
    ("inception", "FID", "inception-2015-12-05.pt",
     "Inception-v3 pool3 features, TorchScript (clean-fid / StyleGAN2-ADA metrics)",
     "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
    ("i3d", "FVD", "i3d_torchscript.pt", "I3D Kinetics-400 features, TorchScript (StyleGAN-V FVD)",
     "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"),
    ("alexnet", "LPIPS", "alexnet-owt-7be5be79.pth",
     "torchvision AlexNet state dict (LPIPS trunk; only `features.*` is read)",
     "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    ("lpips_alex", "LPIPS", "lpips_alex_v0.1.pth", "LPIPS v0.1 linear heads for AlexNet (lpips' weights/v0.1/alex.pth)",
     "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"),
    ("syncnet", "LSE-D, LSE-C", "syncnet_v2.model", "SyncNet state dict (joonson/syncnet_python)",
     "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"),
]}
"""Optional networks of `freetalk evaluate`, by role: file name in MODELS/evaluation, what it is,
the metric that needs it, where to download it. Generation never needs them."""

FIX_HINT = "run `freetalk models download DIR` (real) or `freetalk models tiny DIR` (random, for tests)"

# Hugging Face sources of the real checkpoints (METHOD.md, "Pretrained parts").
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-inpainting"
FACEID_REPO = "h94/IP-Adapter-FaceID"
IMAGE_ENCODER_REPO = "h94/IP-Adapter"
IMAGE_ENCODER_SUBFOLDER = "models/image_encoder"
BUFFALO_L_URLS = (
    "https://github.com/deepinsight/insightface/releases/download/model-zoo/buffalo_l.zip",  # insightface 2.x
    "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",  # the historical release
)

REVISIONS = {
    SD15_REPO: os.environ.get("FREETALK_SD15_REVISION", "main"),
    FACEID_REPO: os.environ.get("FREETALK_FACEID_REVISION", "main"),
    IMAGE_ENCODER_REPO: os.environ.get("FREETALK_IMAGE_ENCODER_REVISION", "main"),
}
"""Revision per repository. `download_models` resolves each to its commit and records it in
MODELS/manifest.json; set the environment variables to a commit hash to pin a later download."""

MANIFEST = "manifest.json"

# Full-size configurations (SD 1.5 inpainting, CLIP ViT-H/14 of IP-Adapter). The tiny models
# change only widths and depths, never the structure the loaders rely on.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=9,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def clip_transformer_config(width: int, layers: int, heads: int, **config) -> dict:
    """A CLIP transformer's configuration: `width` wide (MLP 4 x `width`), `layers` deep,
    `heads` attention heads, and the rest of `config`."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, **config)


SD15_TEXT_CONFIG = clip_transformer_config(768, 12, 12, vocab_size=49408, max_position_embeddings=77,
                                           hidden_act="quick_gelu", projection_dim=768)
CLIP_VIT_H_CONFIG = clip_transformer_config(1280, 32, 16, image_size=224, patch_size=14, projection_dim=1024,
                                            hidden_act="gelu", layer_norm_eps=1e-5)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    prediction_type="epsilon",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    skip_prk_steps=True,
)

FACEID_ID_DIM = 512
FACEID_LORA_RANK = 128
FACEID_NUM_TOKENS = 4
FACEID_RESAMPLER_DEPTH = 4
"""Shape rules of the original FaceID-Plus file that diffusers' converter relies on."""

TINY_SEED = 0
TINY_UNET_CONFIG = dict(
    SD15_UNET_CONFIG,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=1,
    norm_num_groups=8,
)
"""Tiny U-Net: attention only at 1/4 of the latent side, so 512 x 512 runs fast on a CPU."""
TINY_VAE_CONFIG = dict(SD15_VAE_CONFIG, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_CLIP_VISION_CONFIG = dict(
    CLIP_VIT_H_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)
TINY_LORA_RANK = 4
TINY_FACEID_SCALE = 0.1
"""Weight scale of the tiny FaceID-Plus file: large enough that the image prompt visibly steers
the tiny U-Net, so tests of per-frame conditioning measure a real effect."""


# ---------------------------------------------------------------------------------------------
# Locating


def resolve_models_dir(arg: str | os.PathLike | None = None) -> Path:
    """The models directory: `arg` if given, else `$FREETALK_MODELS`.

    Raises ModelFileError when neither is set.
    """
    value = arg if arg not in (None, "") else os.environ.get("FREETALK_MODELS")
    if not value:
        raise ModelFileError(f"no models directory given: pass --models DIR or set FREETALK_MODELS; {FIX_HINT}")
    return Path(value).expanduser().resolve()


def faceid_path(models_dir: str | os.PathLike, variant: str = "plus") -> Path:
    """Path of the FaceID-Plus checkpoint of `variant` ("plus" or "plusv2")."""
    if variant not in FACEID_FILES:
        raise ValueError(f"variant must be one of {sorted(FACEID_FILES)}, got {variant!r}")
    return Path(models_dir) / IP_ADAPTER_DIR / FACEID_FILES[variant]


def arcface_path(models_dir: str | os.PathLike) -> Path:
    """Path of the ArcFace ONNX inside MODELS/insightface; ModelFileError if absent."""
    base = Path(models_dir) / INSIGHTFACE_DIR
    for candidate in ARCFACE_CANDIDATES:
        if (base / candidate).is_file():
            return base / candidate
    raise ModelFileError(f"missing {base / ARCFACE_CANDIDATES[0]}: {FIX_HINT}")


def insightface_detector_path(models_dir: str | os.PathLike) -> Path:
    """Path of the SCRFD detector ONNX inside MODELS/insightface; ModelFileError if absent."""
    base = Path(models_dir) / INSIGHTFACE_DIR
    for candidate in DETECTOR_CANDIDATES:
        if (base / candidate).is_file():
            return base / candidate
    raise ModelFileError(f"missing {base / DETECTOR_CANDIDATES[0]}: --detector insightface needs the "
                         "buffalo_l pack's face detector there (or use the default --detector dlib)")


def evaluation_path(models_dir: str | os.PathLike, role: str) -> Path:
    """Path of the evaluation network `role` (a key of EVALUATION_FILES); ModelFileError, one
    line naming the file and where to get it, when absent."""
    entry = EVALUATION_FILES[role]
    path = Path(models_dir) / EVALUATION_DIR / entry["file"]
    if not path.is_file():
        raise ModelFileError(f"missing {path}: {entry['metric']} needs it; download {entry['url']} "
                             f"and save it there as {entry['file']}")
    return path


# ---------------------------------------------------------------------------------------------
# The FaceID-Plus checkpoint's shape rules


def faceid_image_proj_shapes(
    cross_attention_dim: int, clip_hidden: int, id_dim: int = FACEID_ID_DIM
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the `image_proj` dict of an original FaceID-Plus file (ProjPlusModel).

    The id projection is an MLP `id_dim -> 2*id_dim -> 4 tokens x width`; the face perceiver
    resampler has 4 layers of (PerceiverAttention, FeedForward x4) at width = the U-Net's
    cross-attention width, 64 per head. 56 keys.
    """
    width = cross_attention_dim
    shapes = {
        "proj.0.weight": (2 * id_dim, id_dim),
        "proj.0.bias": (2 * id_dim,),
        "proj.2.weight": (width * FACEID_NUM_TOKENS, 2 * id_dim),
        "proj.2.bias": (width * FACEID_NUM_TOKENS,),
        "norm.weight": (width,),
        "norm.bias": (width,),
        "perceiver_resampler.proj_in.weight": (width, clip_hidden),
        "perceiver_resampler.proj_in.bias": (width,),
        "perceiver_resampler.proj_out.weight": (width, width),
        "perceiver_resampler.proj_out.bias": (width,),
        "perceiver_resampler.norm_out.weight": (width,),
        "perceiver_resampler.norm_out.bias": (width,),
    }
    inner = (width // 64) * 64
    for layer in range(FACEID_RESAMPLER_DEPTH):
        prefix = f"perceiver_resampler.layers.{layer}"
        shapes.update(
            {
                f"{prefix}.0.norm1.weight": (width,),
                f"{prefix}.0.norm1.bias": (width,),
                f"{prefix}.0.norm2.weight": (width,),
                f"{prefix}.0.norm2.bias": (width,),
                f"{prefix}.0.to_q.weight": (inner, width),
                f"{prefix}.0.to_kv.weight": (2 * inner, width),
                f"{prefix}.0.to_out.weight": (width, inner),
                f"{prefix}.1.0.weight": (width,),
                f"{prefix}.1.0.bias": (width,),
                f"{prefix}.1.1.weight": (4 * width, width),
                f"{prefix}.1.3.weight": (width, 4 * width),
            }
        )
    return shapes


def unet_attention_processors(unet_config: dict) -> list[tuple[str, int, int | None]]:
    """(processor name, hidden size, cross-attention width or None for self-attention) for every
    attention processor of a UNet2DConditionModel with `unet_config`, in diffusers' order.

    The U-Net is built on the meta device: no memory, no weights.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    blocks = list(unet.config.block_out_channels)
    result = []
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        result.append((name, hidden, cross))
    return result


def faceid_ip_adapter_shapes(unet_config: dict, lora_rank: int = FACEID_LORA_RANK) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the `ip_adapter` dict of an original FaceID-Plus file for a U-Net.

    Keys are numbered by the U-Net's attention processors in order (self and cross attention
    alternate): every processor has LoRA on q, k, v and out (`{i}.to_q_lora.down.weight`...),
    and every cross-attention processor (odd `i`) has the image-prompt projections
    `{i}.to_k_ip.weight`, `{i}.to_v_ip.weight`. SD 1.5: 32 processors, 288 keys.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (_, hidden, cross) in enumerate(unet_attention_processors(unet_config)):
        context = cross if cross is not None else hidden
        for proj, in_dim in (("to_q", hidden), ("to_k", context), ("to_v", context), ("to_out", hidden)):
            shapes[f"{index}.{proj}_lora.down.weight"] = (lora_rank, in_dim)
            shapes[f"{index}.{proj}_lora.up.weight"] = (hidden, lora_rank)
        if cross is not None:
            shapes[f"{index}.to_k_ip.weight"] = (hidden, cross)
            shapes[f"{index}.to_v_ip.weight"] = (hidden, cross)
    return shapes


def random_faceid_plus_state_dict(
    unet_config: dict,
    clip_hidden: int,
    lora_rank: int = FACEID_LORA_RANK,
    seed: int = TINY_SEED,
    scale: float = 0.02,
) -> dict[str, dict]:
    """A FaceID-Plus checkpoint dict {"image_proj": ..., "ip_adapter": ...} of random weights
    with the real key set and shape rules for a U-Net of `unet_config` (float32 tensors).

    LayerNorm weights are 1 and biases 0 as in an untrained module; everything else is normal
    noise of std `scale`.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)

    def fill(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        is_norm = "norm" in key or ".1.0." in key
        if is_norm and len(shape) == 1:
            return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        return torch.randn(shape, generator=generator) * scale

    image_proj = {k: fill(k, s) for k, s in faceid_image_proj_shapes(unet_config["cross_attention_dim"], clip_hidden).items()}
    ip_adapter = {k: fill(k, s) for k, s in faceid_ip_adapter_shapes(unet_config, lora_rank).items()}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def check_faceid_state_dict(state_dict: dict, unet_config: dict, clip_hidden: int | None, label: str) -> list[str]:
    """Problems of a FaceID-Plus checkpoint dict against the U-Net it will patch (one line each)."""
    problems = []
    if not isinstance(state_dict, dict) or not {"image_proj", "ip_adapter"} <= set(state_dict):
        return [f"{label}: not an original-format IP-Adapter file (needs 'image_proj' and 'ip_adapter' dicts)"]
    image_proj, ip_adapter = state_dict["image_proj"], state_dict["ip_adapter"]
    if clip_hidden is None:
        weight = image_proj.get("perceiver_resampler.proj_in.weight")
        clip_hidden = int(weight.shape[1]) if weight is not None else 0
    rank = None
    for key, value in ip_adapter.items():
        if key.endswith("_lora.down.weight"):
            rank = int(value.shape[0])
            break
    expected = {
        "image_proj": faceid_image_proj_shapes(unet_config["cross_attention_dim"], clip_hidden),
        "ip_adapter": faceid_ip_adapter_shapes(unet_config, rank or FACEID_LORA_RANK),
    }
    for part, shapes in expected.items():
        got = state_dict[part]
        missing = sorted(set(shapes) - set(got))
        extra = sorted(set(got) - set(shapes))
        if missing:
            problems.append(f"{label}: {part} lacks {len(missing)} key(s), e.g. {missing[0]} (expected {len(shapes)} keys)")
        if extra:
            problems.append(f"{label}: {part} has {len(extra)} unexpected key(s), e.g. {extra[0]}")
        for key in sorted(set(shapes) & set(got)):
            shape = tuple(got[key].shape)
            if shape != shapes[key]:
                problems.append(f"{label}: {part}[{key}] has shape {shape}, expected {shapes[key]} for this U-Net")
    return problems

EOS_HINT = (
    "copy the Surrey Face Model files (sfm_shape_3448.bin, expression_blendshapes_3448.bin, ibug_to_sfm.txt, "
    "sfm_3448_edge_topology.json, sfm_model_contours.json from https://github.com/patrikhuber/eos/tree/master/share) "
    "into MODELS/eos, or set FREETALK_EOS_DIR to a folder that holds them"
)
