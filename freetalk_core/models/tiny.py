"""Tiny random-weight checkpoints in the real on-disk formats (`freetalk models tiny`): the loaders
that read the real checkpoints read these unchanged. Also the full-size diffusion pipeline with
random weights (`full_size_random_pipeline`), for measuring speed and memory without the real
checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from freetalk_core.errors import ModelFileError
from freetalk_core.models import layout
from freetalk_core.models.layout import (
    CLIP_VIT_H_CONFIG,
    EOS_DIR,
    EOS_FILES,
    EOS_HINT,
    FACEID_FILES,
    IMAGE_ENCODER_DIR,
    INSIGHTFACE_DIR,
    IP_ADAPTER_DIR,
    SCHEDULER_CONFIG,
    SD15_DIR,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    TINY_CLIP_VISION_CONFIG,
    TINY_FACEID_SCALE,
    TINY_LORA_RANK,
    TINY_SEED,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    faceid_path,
    random_faceid_plus_state_dict,
)

# ---------------------------------------------------------------------------------------------
# Tiny models




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
    write_tiny_evaluation_models(models_dir)
    link_eos(models_dir / EOS_DIR, eos_source)
    return models_dir


ALEXNET_CLASSIFIER_SHAPES = {
    "classifier.1.weight": (4096, 9216),
    "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096),
    "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}
"""The classifier part of torchvision's AlexNet file (LPIPS never reads it)."""


def write_tiny_evaluation_models(models_dir: str | os.PathLike) -> Path:
    """The optional evaluation networks of MODELS/evaluation with random weights (fixed seed), in
    their real formats, about 2 MB in all:

    - Inception and I3D: TorchScript archives with the real call signatures and feature widths
      (`model(x, return_features=True)` -> (N, 2048); `detector(x, rescale=, resize=,
      return_features=True)` -> (B, 400)): average pooling and one linear layer.
    - AlexNet, the LPIPS heads and SyncNet: state dicts with the real files' keys and shapes.
      A weight of shape (O, ...) is a Hankel view of O + prod(...) - 1 random numbers (entry
      [o, r] is value o + r of the flattened rest), so the files hold kilobytes while every
      tensor has its real shape and no two output channels are equal. BatchNorm layers are
      as untrained (scale 1, shift 0, running mean 0, variance 1).
    """
    import torch

    from freetalk_core.evaluation.networks import alexnet_feature_shapes, lpips_head_shapes, quiet_torchscript
    from freetalk_core.evaluation.syncnet import syncnet_shapes

    folder = Path(models_dir) / layout.EVALUATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(TINY_SEED)
    torch.manual_seed(TINY_SEED)
    inception, i3d = _tiny_feature_networks()
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(inception()), str(folder / layout.EVALUATION_FILES["inception"]["file"]))
        torch.jit.save(torch.jit.script(i3d()), str(folder / layout.EVALUATION_FILES["i3d"]["file"]))

    alexnet = {k: _hankel_random(s, generator) for k, s in {**alexnet_feature_shapes(), **ALEXNET_CLASSIFIER_SHAPES}.items()}
    torch.save(alexnet, folder / layout.EVALUATION_FILES["alexnet"]["file"])
    heads = {k: torch.rand(s, generator=generator) * 0.1 for k, s in lpips_head_shapes().items()}
    torch.save(heads, folder / layout.EVALUATION_FILES["lpips_alex"]["file"])

    shapes = syncnet_shapes()
    norms = {k.rsplit(".", 1)[0] for k in shapes if k.endswith("running_mean")}
    syncnet = {}
    for key, shape in shapes.items():
        module, name = key.rsplit(".", 1)
        if module in norms:
            syncnet[key] = torch.ones(shape) if name in ("weight", "running_var") else torch.zeros(shape)
        else:
            syncnet[key] = _hankel_random(shape, generator)
    torch.save(syncnet, folder / layout.EVALUATION_FILES["syncnet"]["file"])
    return folder


def _hankel_random(shape: tuple[int, ...], generator):
    """Random float32 tensor of `shape`: plain for a vector (biases: zero), else a Hankel view
    of He-scaled noise (std sqrt(2 / fan_in))."""
    import math

    import torch

    if len(shape) == 1:
        return torch.zeros(shape)
    rest = math.prod(shape[1:])
    base = torch.randn(shape[0] + rest - 1, generator=generator) * math.sqrt(2.0 / rest)
    strides = [1]
    for index in range(1, len(shape)):
        strides.append(math.prod(shape[index + 1:]))
    return base.as_strided(shape, strides)


def _tiny_feature_networks():
    """Tiny stand-ins of the Inception (FID) and I3D (FVD) TorchScript networks."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TinyInception(nn.Module):
        """Takes (N, 3, H, W) in [0, 255], resizes to 299 x 299 and normalises as the real one,
        then 4 x 4 average pooling and a linear layer to 2048 non-negative features."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 4 * 4, 2048)

        def forward(self, img, return_features: bool = False):
            x = img.to(torch.float32)
            if x.shape[2] != 299 or x.shape[3] != 299:
                x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
            x = (x - 128) / 128
            features = torch.relu(self.fc(F.adaptive_avg_pool2d(x, [4, 4]).flatten(1)))
            if return_features:
                return features
            return torch.softmax(features[:, :1008], dim=1)

    class TinyI3D(nn.Module):
        """Takes (B, 3, T, H, W), in [0, 255] with rescale, else in [-1, 1]; resize brings it to
        224 x 224; 4 x 4 x 4 average pooling and a linear layer to 400 features."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 4 * 4 * 4, 400)

        def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
            x = x.to(torch.float32)
            if rescale:
                x = x / 127.5 - 1
            if resize:
                x = F.interpolate(x, size=[x.shape[2], 224, 224], mode="trilinear", align_corners=False)
            features = self.fc(F.adaptive_avg_pool3d(x, [4, 4, 4]).flatten(1))
            if return_features:
                return features
            return torch.softmax(features, dim=1)

    return TinyInception, TinyI3D


def link_eos(target: Path, eos_source) -> None:
    source = eos_source or os.environ.get("FREETALK_EOS_DIR")
    if not source:
        if all((target / name).is_file() for name in EOS_FILES.values()):
            return
        raise ModelFileError(f"no eos source: {EOS_HINT}")
    source = Path(source).resolve()
    missing = [name for name in EOS_FILES.values() if not (source / name).is_file()]
    if missing:
        raise ModelFileError(f"{source} lacks {', '.join(missing)}: {EOS_HINT}")
    target.mkdir(parents=True, exist_ok=True)
    for name in EOS_FILES.values():
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
    write_clip_image_processor(folder)


def write_clip_image_processor(folder: Path) -> None:
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


def write_tiny_scrfd(path: str | os.PathLike, side: int = 640) -> Path:
    """An ONNX with SCRFD's interface (buffalo_l's det_10g.onnx): input (1, 3, side, side), nine
    outputs: for strides 8, 16 and 32 the scores (N, 1), box distances (N, 4) and five keypoint
    offsets (N, 10) of two anchors per position. One strided convolution per stride and output,
    random weights (boxes and keypoints come out in the right place and scale format, not on
    faces)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(TINY_SEED)
    nodes, inits, outputs = [], [], []
    strides, widths = (8, 16, 32), {"score": 1, "bbox": 4, "kps": 10}
    for kind, width in widths.items():
        for stride in strides:
            name = f"{kind}_{stride}"
            weight = (rng.standard_normal((2 * width, 3, stride, stride)) * 0.01).astype(np.float32)
            bias = np.full(2 * width, {"score": 0.0, "bbox": 2.0, "kps": 0.0}[kind], np.float32)
            inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b"),
                      numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape")]
            last = f"{name}_flat" if kind != "score" else f"{name}_logit"
            nodes += [helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                                       kernel_shape=[stride, stride], strides=[stride, stride]),
                      helper.make_node("Transpose", [f"{name}_conv"], [f"{name}_t"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [last])]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"{name}_flat"]))
            count = (side // stride) ** 2 * 2
            outputs.append(helper.make_tensor_value_info(f"{name}_flat", TensorProto.FLOAT, [count, width]))
    graph = helper.make_graph(nodes, "scrfd_tiny",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="freetalk")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def full_size_random_pipeline(device, dtype, workdir: str | os.PathLike):
    """The product's diffusion pipeline (`freetalk_core.diffusion.attach_faceid`) at the real
    SD 1.5 inpainting and FaceID-Plus sizes with random weights (fixed seed): the same FLOPs and
    memory as the real checkpoints. `workdir` receives the tokenizer. Returns `(pipe, CLIP width)`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from freetalk_core.diffusion import attach_faceid

    tokenizer = Path(workdir) / "tokenizer"
    write_tiny_tokenizer(tokenizer)
    torch.manual_seed(TINY_SEED)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    pipe = StableDiffusionInpaintPipeline(
        vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        unet=unet.to(dtype), scheduler=DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    clip_hidden = CLIP_VIT_H_CONFIG["hidden_size"]
    faceid = random_faceid_plus_state_dict(SD15_UNET_CONFIG, clip_hidden)
    return attach_faceid(pipe, faceid).to(device), clip_hidden
