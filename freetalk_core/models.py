"""The models directory: what goes where, how to check it, tiny stand-ins and the real download.

Layout (ARCHITECTURE.md, "Models directory")::

    MODELS/sd15-inpainting/   diffusers StableDiffusionInpaintPipeline folder (9-channel U-Net)
    MODELS/ip-adapter/        ip-adapter-faceid-plus_sd15.bin and/or ip-adapter-faceid-plusv2_sd15.bin
    MODELS/image_encoder/     CLIPVisionModelWithProjection (ViT-H/14: 257 x 1280 hidden states)
    MODELS/insightface/       w600k_r50.onnx (ArcFace of the buffalo_l pack), or models/buffalo_l/...
    MODELS/eos/               the Surrey Face Model files

`write_tiny_models` fills such a directory with random weights of tiny width in exactly these
on-disk formats, so the loaders that read the real checkpoints read the tiny ones unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from freetalk_core.errors import ModelFileError

SD15_DIR = "sd15-inpainting"
IP_ADAPTER_DIR = "ip-adapter"
IMAGE_ENCODER_DIR = "image_encoder"
INSIGHTFACE_DIR = "insightface"
EOS_DIR = "eos"

FACEID_FILES = {
    "plus": "ip-adapter-faceid-plus_sd15.bin",
    "plusv2": "ip-adapter-faceid-plusv2_sd15.bin",
}
"""FaceID-Plus variants: file name in MODELS/ip-adapter. v2 turns the projection shortcut on."""

ARCFACE_CANDIDATES = ("w600k_r50.onnx", "models/buffalo_l/w600k_r50.onnx", "buffalo_l/w600k_r50.onnx")
"""Where MODELS/insightface may hold the ArcFace ONNX: bare, or inside an unpacked buffalo_l pack."""

EOS_FILES = (
    "sfm_shape_3448.bin",
    "expression_blendshapes_3448.bin",
    "ibug_to_sfm.txt",
    "sfm_3448_edge_topology.json",
    "sfm_model_contours.json",
)

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
    **{f"{EOS_DIR}/{name}": "Surrey Face Model (eos)" for name in EOS_FILES},
}
"""Every file or folder the product reads, relative to the models directory, and what it is."""

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
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_VIT_H_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
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


# ---------------------------------------------------------------------------------------------
# Checking


@dataclass
class ModelEntry:
    path: str
    what: str
    present: bool


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
        problems += _check_arcface(onnx_path, models_dir)

    eos = models_dir / EOS_DIR
    for name in EOS_FILES:
        if not (eos / name).is_file():
            problems.append(f"missing {EOS_DIR}/{name}: {EOS_HINT}")
    return problems


def _check_arcface(path: Path, models_dir: Path) -> list[str]:
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
    """describe_models as text, one line per entry."""
    lines = [f"models directory: {models_dir}"]
    for entry in describe_models(models_dir):
        lines.append(f"  [{'ok' if entry.present else '--'}] {entry.path:48s} {entry.what}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tiny models


EOS_HINT = (
    "copy the Surrey Face Model files (sfm_shape_3448.bin, expression_blendshapes_3448.bin, ibug_to_sfm.txt, "
    "sfm_3448_edge_topology.json, sfm_model_contours.json from https://github.com/patrikhuber/eos/tree/master/share) "
    "into MODELS/eos, or set FREETALK_EOS_DIR to a folder that holds them"
)


def write_tiny_models(models_dir: str | os.PathLike, eos_source: str | os.PathLike | None = None) -> Path:
    """Write tiny random-weight checkpoints (fixed seed) in the real on-disk formats.

    The SD-inpainting folder, the FaceID-Plus and PlusV2 .bin files, the CLIP image encoder and
    the ArcFace ONNX are generated; the eos files are linked (or copied) from `eos_source`,
    else `$FREETALK_EOS_DIR`. Raises ModelFileError (after writing the rest) when no eos source
    is available. Returns the models directory.
    """
    import torch

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    _write_tiny_sd15(models_dir / SD15_DIR)
    _write_tiny_image_encoder(models_dir / IMAGE_ENCODER_DIR)
    faceid = random_faceid_plus_state_dict(
        TINY_UNET_CONFIG, TINY_CLIP_VISION_CONFIG["hidden_size"], TINY_LORA_RANK, scale=TINY_FACEID_SCALE
    )
    (models_dir / IP_ADAPTER_DIR).mkdir(exist_ok=True)
    for variant in FACEID_FILES:
        torch.save(faceid, faceid_path(models_dir, variant))
    _write_tiny_arcface(models_dir / INSIGHTFACE_DIR / "w600k_r50.onnx")
    _link_eos(models_dir / EOS_DIR, eos_source)
    return models_dir


def _link_eos(target: Path, eos_source) -> None:
    source = eos_source or os.environ.get("FREETALK_EOS_DIR")
    if not source:
        if all((target / name).is_file() for name in EOS_FILES):
            return
        raise ModelFileError(f"no eos source: {EOS_HINT}")
    source = Path(source).resolve()
    missing = [name for name in EOS_FILES if not (source / name).is_file()]
    if missing:
        raise ModelFileError(f"{source} lacks {', '.join(missing)}: {EOS_HINT}")
    target.mkdir(parents=True, exist_ok=True)
    for name in EOS_FILES:
        dest = target / name
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        try:
            dest.symlink_to(source / name)
        except OSError:
            shutil.copy2(source / name, dest)


def write_tiny_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary (256 byte symbols, their word-final forms, a few merges,
    start/end tokens) in CLIPTokenizer's files. Returns the vocabulary size."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(ByteLevel.alphabet())
    merges = [("a", "n"), ("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n</w>")]
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    return len(vocab)


def _write_tiny_sd15(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(TINY_SEED)
    UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder / "vae")
    text_config = CLIPTextConfig(
        **dict(SD15_TEXT_CONFIG, vocab_size=vocab_size, hidden_size=TINY_UNET_CONFIG["cross_attention_dim"],
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               projection_dim=TINY_UNET_CONFIG["cross_attention_dim"]),
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _write_tiny_image_encoder(folder: Path) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(TINY_SEED + 1)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG))
    model.save_pretrained(folder)
    _write_clip_image_processor(folder)


def _write_clip_image_processor(folder: Path) -> None:
    """preprocessor_config.json of OpenAI CLIP preprocessing at 224 px (as in h94/IP-Adapter)."""
    config = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 224},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _write_tiny_arcface(path: Path) -> None:
    """An ONNX with ArcFace's interface: input (N, 3, 112, 112) float, output (N, 512): a strided
    convolution, a ReLU and a fully connected layer with random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(TINY_SEED)
    channels, stride = 8, 8
    side = 112 // stride
    conv_w = (rng.standard_normal((channels, 3, stride, stride)) * 0.05).astype(np.float32)
    conv_b = np.zeros(channels, np.float32)
    fc_w = (rng.standard_normal((512, channels * side * side)) * 0.02).astype(np.float32)
    fc_b = np.zeros(512, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["conv"], name="conv_1",
                             kernel_shape=[stride, stride], strides=[stride, stride]),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu_1"),
            helper.make_node("Flatten", ["relu"], ["flat"], name="flatten_1", axis=1),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], name="fc_1", transB=1),
        ],
        "arcface_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])],
        [numpy_helper.from_array(a, n) for a, n in
         ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"), (fc_b, "fc_b"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="freetalk")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


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
    _write_clip_image_processor(models_dir / IMAGE_ENCODER_DIR)
    for v in faceid_variants:
        records.append(_fetch(api, FACEID_REPO, FACEID_FILES[v], commits[FACEID_REPO], faceid_path(models_dir, v),
                              staging, log))
    records.append(_download_arcface(models_dir / INSIGHTFACE_DIR, log))
    try:
        _link_eos(models_dir / EOS_DIR, eos_source)
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
    problems = _check_arcface(target, folder.parent)
    if problems:
        raise ModelFileError(problems[0])
    return {"url": url, "archive_sha256": archive_sha, "file": "w600k_r50.onnx", "sha256": _sha256(target)}
