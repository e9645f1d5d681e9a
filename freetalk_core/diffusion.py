"""Per-frame diffusion (METHOD.md step 6): SD 1.5 inpainting + IP-Adapter-FaceID-Plus.

Every frame of a batch is the masked identity crop (the mouth mask of `face_crop`: the lower
face from landmarks, dilated and feathered) inpainted under its own image prompt: the shared
identity embedding `z` and the frame's adjusted structure embedding `e'_t`; the negative branch
of classifier-free guidance gets zeros for `z` and the CLIP embedding of a zero image. The text
prompt is empty. DPM-Solver++ (multistep), 20 steps, guidance 7.5, strength 1.0 and IP-Adapter
scale 1.0 by default; FaceID-Plus by default, PlusV2 (its projection shortcut on) selectable.
Every frame starts from the same initial noise latent (one seed), and a frame's result does not
depend on the other frames of its batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from freetalk_core.errors import ModelFileError
from freetalk_core.models.layout import FACEID_FILES, FACEID_REPO, FIX_HINT, SD15_DIR, SD15_REPO, faceid_path

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_IP_SCALE = 1.0
LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8


def _sd15_source(models_dir) -> tuple[str, dict]:
    folder = Path(models_dir) / SD15_DIR if models_dir is not None else None
    if folder is not None and (folder / "model_index.json").is_file():
        return str(folder), {}
    return SD15_REPO, {"local_files_only": True}


def _faceid_source(models_dir, variant: str) -> Path:
    path = faceid_path(models_dir if models_dir is not None else "MODELS", variant)
    if models_dir is not None and path.is_file():
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(FACEID_REPO, FACEID_FILES[variant], local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelFileError(f"missing {path}: {FIX_HINT}") from error


def _fp16_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """"fp16" where the U-Net has fp16 variant files and either half precision is wanted or
    only the variant is there."""
    unet = folder / "unet"
    has_fp16 = any(unet.glob("*.fp16.safetensors")) or any(unet.glob("*.fp16.bin"))
    has_full = any(p for p in unet.glob("diffusion_pytorch_model.*") if ".fp16." not in p.name)
    if has_fp16 and (dtype == torch.float16 or not has_full):
        return "fp16"
    return None


def load_pipeline(models_dir, device="cpu", dtype=torch.float32, faceid_variant: str = "plus"):
    """StableDiffusionInpaintPipeline with IP-Adapter-FaceID-Plus (or PlusV2) and DPM-Solver++.

    Reads MODELS/sd15-inpainting and MODELS/ip-adapter/<variant file> (or the Hugging Face cache),
    never downloads. The FaceID LoRA is applied through peft and checked to be in place; the
    safety checker is off; PlusV2 turns the projection shortcut on.

    Raises ModelFileError for a missing model and RuntimeError when the LoRA could not be applied.
    """
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # HF_HUB_DISABLE_PROGRESS_BARS: diffusers' loading bar too
        diffusers_logging.disable_progress_bar()
    source, kwargs = _sd15_source(models_dir)
    if source == SD15_REPO:
        variant = None
    else:
        variant = _fp16_variant(Path(source), dtype)
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            source, dtype=dtype, variant=variant, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kwargs,
        )
    except OSError as error:
        where = Path(models_dir) / SD15_DIR if models_dir is not None else source
        raise ModelFileError(f"cannot load {where} ({str(error).splitlines()[0][:160]}): {FIX_HINT}") from error
    return attach_faceid(pipe, _faceid_source(models_dir, faceid_variant), faceid_variant).to(device)


def attach_faceid(pipe, faceid, faceid_variant: str = "plus"):
    """Make a loaded StableDiffusionInpaintPipeline the product's pipeline: DPM-Solver++ (2nd
    order multistep), IP-Adapter-FaceID-Plus from `faceid` (path of an original-format .bin, or
    its state dict) with its LoRA applied and checked, the projection shortcut on for PlusV2,
    progress bars off. Returns `pipe`.
    """
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils import USE_PEFT_BACKEND

    if faceid_variant not in FACEID_FILES:
        raise ValueError(f"faceid_variant must be one of {sorted(FACEID_FILES)}, got {faceid_variant!r}")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    if not USE_PEFT_BACKEND:
        raise RuntimeError("peft is not installed: diffusers would drop the FaceID LoRA; `pip install peft`")
    if isinstance(faceid, dict):
        pipe.load_ip_adapter(faceid, subfolder=None, weight_name=None, image_encoder_folder=None)
    else:
        faceid = Path(faceid)
        pipe.load_ip_adapter(str(faceid.parent), subfolder="", weight_name=faceid.name, image_encoder_folder=None)
    _check_faceid_lora(pipe.unet)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.shortcut = faceid_variant == "plusv2"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_faceid_lora(unet) -> None:
    """The FaceID LoRA must be live in every attention projection it targets."""
    if "faceid_0" not in getattr(unet, "peft_config", {}):
        raise RuntimeError("the FaceID LoRA was not loaded into the U-Net (is peft installed?)")
    lora_layers = _lora_layer_names(unet)
    # the resampler inside encoder_hid_proj has attention processors of its own, without LoRA
    expected = 4 * sum(not name.startswith("encoder_hid_proj") for name in unet.attn_processors)
    if len(lora_layers) != expected:
        raise RuntimeError(f"the FaceID LoRA reached {len(lora_layers)} of {expected} attention projections")


def _lora_layer_names(unet) -> list[str]:
    return [name for name, module in unet.named_modules()
            if hasattr(module, "lora_A") and "faceid_0" in getattr(module, "lora_A", {})]


def faceid_lora_layers(pipe) -> list[str]:
    """Names of the U-Net modules that carry the FaceID LoRA as live peft layers (4 per attention
    layer; none once `optimize_pipeline` has folded it into the weights)."""
    return _lora_layer_names(pipe.unet)


def initial_noise(seed: int, height: int = 512, width: int = 512, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The initial noise latent shared by every frame of a clip: `(1, 4, height/8, width/8)`.

    Drawn on the CPU from `torch.Generator().manual_seed(seed)`, so the same seed gives the same
    latent on any device.
    """
    if height % VAE_DOWNSCALE or width % VAE_DOWNSCALE:
        raise ValueError(f"height and width must be multiples of {VAE_DOWNSCALE}, got {height}x{width}")
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((1, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE), generator=generator)
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def masked_image_latents(pipe, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VAE latents of the crops with the inpainting region blanked, as the pipeline builds them,
    but from the posterior mean: they condition the U-Net, and a sampled latent would tie each
    frame to its position in the batch's random stream.

    Args:
        image: `(B, 3, H, W)` float in [-1, 1] (the pipeline's preprocessed crops).
        mask: `(B, 1, H, W)` float, binarised (1 = inpaint).

    Returns:
        `(B, 4, H/8, W/8)` in the VAE's dtype, scaled by its scaling factor.
    """
    vae = pipe.vae
    masked = (image * (mask < 0.5)).to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(masked).latent_dist.mode()
    return latents * vae.config.scaling_factor


def _check_inputs(crops, masks, structure_embeds, negative_embed, identity_embed, noise) -> None:
    b = len(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be (B, H, W, 3) uint8, got {crops.shape} {crops.dtype}")
    height, width = crops.shape[1:3]
    if masks.shape != (b, height, width):
        raise ValueError(f"masks must be ({b}, {height}, {width}), got {masks.shape}")
    if structure_embeds.ndim != 3 or structure_embeds.shape[0] != b:
        raise ValueError(f"structure_embeds must be ({b}, 257, D), got {tuple(structure_embeds.shape)}")
    if tuple(negative_embed.shape) != tuple(structure_embeds.shape[1:]):
        raise ValueError(f"negative_embed must be {tuple(structure_embeds.shape[1:])}, got {tuple(negative_embed.shape)}")
    if identity_embed.ndim != 1:
        raise ValueError(f"identity_embed must be (512,), got {tuple(identity_embed.shape)}")
    expected_noise = (1, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    if tuple(noise.shape) != expected_noise:
        raise ValueError(f"noise must be {expected_noise}, got {tuple(noise.shape)}")


def generate_frames(
    pipe,
    crops: np.ndarray,
    masks: np.ndarray,
    structure_embeds,
    negative_embed,
    identity_embed,
    noise: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    ip_scale: float = DEFAULT_IP_SCALE,
    output_type: str = "uint8",
) -> np.ndarray:
    """Inpaint the mouth region of every crop under its own structure embedding, in one batch.

    Args:
        pipe: from `load_pipeline`.
        crops: `(B, H, W, 3)` uint8 RGB identity crops (H, W multiples of 8; 512 x 512).
        masks: `(B, H, W)` float32 in [0, 1], 1 = regenerate; binarised at 0.5 as the pipeline does.
        structure_embeds: `(B, 257, D)` float, the adjusted structure embeddings `e'_t`.
        negative_embed: `(257, D)` float, CLIP of a zero image.
        identity_embed: `(512,)` float, the identity embedding `z`.
        noise: `(1, 4, H/8, W/8)` from `initial_noise`, the same for every frame.
        steps: DPM-Solver++ steps; guidance: classifier-free guidance scale; ip_scale: IP-Adapter scale.
        output_type: "uint8" for `(B, H, W, 3)` uint8, "float" for `(B, H, W, 3)` float32 in [0, 1].

    Returns:
        The generated crops.
    """
    if output_type not in ("uint8", "float"):
        raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
    crops = np.asarray(crops)
    masks = np.asarray(masks, dtype=np.float32)
    structure_embeds = torch.as_tensor(np.asarray(structure_embeds, dtype=np.float32))
    negative_embed = torch.as_tensor(np.asarray(negative_embed, dtype=np.float32))
    identity_embed = torch.as_tensor(np.asarray(identity_embed, dtype=np.float32))
    _check_inputs(crops, masks, structure_embeds, negative_embed, identity_embed, noise)
    b, height, width = crops.shape[:3]
    device, dtype = pipe.unet.device, pipe.unet.dtype

    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    mask = pipe.mask_processor.preprocess(torch.from_numpy(masks)[:, None])
    conditioning_latents = masked_image_latents(pipe, pipe.image_processor.preprocess(pixels), mask)

    # The pipeline repeats the (shared) identity embedding for each of the b prompts; the
    # structure embeddings go straight to the resampler, one per frame. With classifier-free
    # guidance, negatives come first, as the pipeline orders its batch.
    clip_embeds = structure_embeds[:, None]
    id_embeds = identity_embed[None, None]
    if guidance > 1.0:
        clip_embeds = torch.cat([negative_embed.expand(b, 1, *negative_embed.shape), clip_embeds])
        id_embeds = torch.cat([torch.zeros_like(id_embeds), id_embeds])
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = clip_embeds.to(device=device, dtype=dtype)
    pipe.set_ip_adapter_scale(ip_scale)
    try:
        result = pipe(
            prompt=[""] * b,
            image=pixels,
            mask_image=mask,
            masked_image_latents=conditioning_latents,
            height=height,
            width=width,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.to(device=device, dtype=dtype).expand(b, -1, -1, -1).contiguous(),
            ip_adapter_image_embeds=[id_embeds.to(device=device, dtype=dtype)],
            output_type="np",
        ).images
    finally:
        projection.clip_embeds = None
    frames = np.asarray(result, dtype=np.float32)
    if output_type == "float":
        return frames
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The product's precision: float16 on CUDA, float32 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def optimize_pipeline(pipe, fuse_lora: bool = True, channels_last: bool | None = None, compile_unet: bool = False,
                      vae_slicing: bool | None = None):
    """Speed and memory settings that leave every frame's result unchanged beyond float rounding.

    - fuse_lora: fold the FaceID LoRA into the attention weights (one matmul instead of three per
      projection), then drop the peft layers.
    - channels_last: NHWC memory format for the U-Net and VAE convolutions (default: on CUDA).
    - compile_unet: `torch.compile` the U-Net (pays off over many batches of the same size).
    - vae_slicing: decode one frame at a time, so the VAE's full-resolution activations do not
      grow with the batch (default: on CUDA).
    Returns `pipe`.
    """
    if fuse_lora and "faceid_0" in getattr(pipe.unet, "peft_config", {}):
        pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["faceid_0"])
        pipe.unload_lora_weights()
    if channels_last is None:
        channels_last = pipe.unet.device.type == "cuda"
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if vae_slicing is None:
        vae_slicing = pipe.unet.device.type == "cuda"
    if vae_slicing:
        pipe.vae.enable_slicing()
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return pipe


def default_batch_size(device) -> int:
    """Frames per batch: 4 on a CPU; on a GPU, what its free memory holds at about 1 GiB per frame
    (fp16, 512 x 512, guidance doubles the U-Net batch) after 3 GiB for weights, 1 to 16."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(16, (free - 3 * 2**30) // 2**30)))


def generate_in_batches(pipe, crops, masks, structure_embeds, negative_embed, identity_embed, noise,
                        batch_size: int | None = None, on_batch=None, **kwargs) -> np.ndarray:
    """`generate_frames` over any number of frames, `batch_size` at a time (default:
    `default_batch_size`). Out of GPU memory, the batch size is halved and the batch retried;
    results do not depend on the batch size. `on_batch(done, total)` reports progress.

    Returns `(T, H, W, 3)` uint8 (or float32 with output_type="float").
    """
    total = len(crops)
    batch_size = batch_size or default_batch_size(pipe.unet.device)
    out, start = [], 0
    while start < total:
        stop = min(total, start + batch_size)
        try:
            out.append(generate_frames(pipe, crops[start:stop], masks[start:stop], structure_embeds[start:stop],
                                       negative_embed, identity_embed, noise, **kwargs))
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
        if on_batch is not None:
            on_batch(start, total)
    return np.concatenate(out) if out else np.zeros((0, *np.shape(crops)[1:]), np.uint8)
