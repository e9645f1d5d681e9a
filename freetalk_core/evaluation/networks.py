"""The learned-network metrics FID, FVD and LPIPS, on the standard pretrained networks.

Files, in MODELS/evaluation (`freetalk_core.models.EVALUATION_FILES` says where to get them):

- FID: `inception-2015-12-05.pt`, the TorchScript Inception-v3 of clean-fid and the StyleGAN2-ADA
  / StyleGAN3 metrics. Frames are resized to 299 x 299 (bicubic, antialiased, as clean-fid's
  "clean" mode) and given as float NCHW in [0, 255] to `model(x, return_features=True)`, which
  normalises them itself and returns the 2048 pool3 features.
- FVD: `i3d_torchscript.pt`, the TorchScript I3D (Kinetics-400) of StyleGAN-V. Each video is cut
  into clips of 16 frames; a clip's shorter side is resized to 224 (bilinear), centre-cropped to
  224 x 224 and scaled to [-1, 1], then `detector(clips, rescale=False, resize=False,
  return_features=True)` on (B, 3, 16, 224, 224) gives 400 features per clip.
- LPIPS v0.1, AlexNet trunk (`alexnet-owt-7be5be79.pth`, torchvision's weights, only
  `features.*` read; `lpips_alex_v0.1.pth`, lpips' `weights/v0.1/alex.pth`): frames in [-1, 1],
  lpips' scaling layer, the five ReLU outputs unit-normalised along channels, squared
  differences weighted by the 1x1 linear heads, spatially averaged and summed over layers.

FID and FVD are the Fréchet distance between Gaussians fitted to the two feature sets.
Loaded networks are kept per (file, device), so a dataset evaluation loads each once.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from freetalk_core.errors import ModelFileError
from freetalk_core.models.layout import EVALUATION_DIR, EVALUATION_FILES, evaluation_path

INCEPTION_FEATURES = 2048
I3D_FEATURES = 400
INCEPTION_SIDE = 299
I3D_SIDE = 224
FVD_CLIP_LEN = 16
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def default_device(device: str | None = None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@contextmanager
def quiet_torchscript():
    """TorchScript without torch's deprecation notices: the metric networks are published as
    TorchScript archives, so that is the format to read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


def _unusable(path: Path, role: str, error: BaseException) -> ModelFileError:
    detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return ModelFileError(f"cannot load {path} ({detail}): download {EVALUATION_FILES[role]['url']} again "
                          f"and save it there as {EVALUATION_FILES[role]['file']}")


def _file_key(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the file is replaced."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased; zero for fewer than two rows) of (N, D) features."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    sigma = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]) if len(x) > 1 else np.zeros((x.shape[1],) * 2)
    return x.mean(axis=0), sigma


def _mean_and_factor(value) -> tuple[np.ndarray, np.ndarray]:
    """(mu, F) with covariance = F @ F.T, from (N, D) features or a (mu, sigma) pair.

    From features F has min(N, D) columns (the centred rows, or their QR factor when N > D), so
    a few hundred frames never need a D x D decomposition. From a covariance F is its symmetric
    square root (eigenvalues below zero, from rounding, are taken as zero).
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        mu = np.asarray(value[0], dtype=np.float64).reshape(-1)
        sigma = np.asarray(value[1], dtype=np.float64)
        if sigma.shape != (mu.size, mu.size):
            raise ValueError(f"covariance of shape {sigma.shape} does not match a mean of {mu.size} values")
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        return mu, v * np.sqrt(np.clip(w, 0.0, None))
    x = np.asarray(value, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, D) array or a (mu, sigma) pair, got shape {x.shape}")
    mu = x.mean(axis=0)
    if len(x) < 2:
        return mu, np.zeros((x.shape[1], 1))
    centred = (x - mu) / np.sqrt(len(x) - 1)
    if len(x) > x.shape[1]:
        return mu, np.linalg.qr(centred, mode="r").T
    return mu, centred.T


def frechet_distance(a, b) -> float:
    """Fréchet distance between the Gaussians of `a` and `b`, each (N, D) features or a
    (mu, sigma) pair: |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    With S = F F^T for each side, the eigenvalues of S_a S_b are the squared singular values of
    F_a^T F_b, so tr((S_a S_b)^(1/2)) is that matrix's nuclear norm: the same value as
    pytorch-fid's `scipy.linalg.sqrtm` formula, exact for singular covariances (fewer samples
    than dimensions) without its eps offset, never complex, and without a 2048 x 2048 matrix
    square root when the features are given.
    """
    mu_a, f_a = _mean_and_factor(a)
    mu_b, f_b = _mean_and_factor(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.size} and {mu_b.size}")
    cross = np.linalg.svd(f_a.T @ f_b, compute_uv=False).sum()
    value = np.sum((mu_a - mu_b) ** 2) + np.sum(f_a**2) + np.sum(f_b**2) - 2 * cross
    return float(max(value, 0.0))


# ---------------------------------------------------------------------------------------------
# TorchScript feature networks (Inception, I3D)


@lru_cache(maxsize=8)
def _torchscript(key: tuple[str, int, int], role: str, device: str):
    import torch

    try:
        with quiet_torchscript():
            model = torch.jit.load(key[0], map_location="cpu")
    except Exception as error:  # a damaged archive raises RuntimeError or zip errors
        raise _unusable(Path(key[0]), role, error) from error
    return model.eval().to(device)


def load_inception(models_dir: str | os.PathLike, device: str | None = None):
    """The FID Inception network of MODELS/evaluation (cached per file and device)."""
    path = evaluation_path(models_dir, "inception")
    return _torchscript(_file_key(path), "inception", default_device(device))


def load_i3d(models_dir: str | os.PathLike, device: str | None = None):
    """The FVD I3D network of MODELS/evaluation (cached per file and device)."""
    path = evaluation_path(models_dir, "i3d")
    return _torchscript(_file_key(path), "i3d", default_device(device))


def _frames_tensor(frames) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    import torch

    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or len(array) == 0:
        raise ValueError(f"frames must be uint8 (N, H, W, 3) RGB, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def _check_width(features, width: int, path: Path, role: str):
    if features.ndim != 2 or features.shape[1] != width:
        raise ModelFileError(f"{path} gives features of shape {tuple(features.shape)}, expected (N, {width}): "
                             f"download {EVALUATION_FILES[role]['url']} again")
    return features


def inception_features(frames, models_dir: str | os.PathLike, device: str | None = None,
                       batch_size: int = 32) -> np.ndarray:
    """(N, 2048) Inception pool3 features of uint8 (N, H, W, 3) RGB frames."""
    import torch
    import torch.nn.functional as F

    device = default_device(device)
    model = load_inception(models_dir, device)
    path = evaluation_path(models_dir, "inception")
    images = _frames_tensor(frames)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)
            if x.shape[-2:] != (INCEPTION_SIDE, INCEPTION_SIDE):
                x = F.interpolate(x, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 255)
            features = model(x, return_features=True)
            out.append(_check_width(features.reshape(len(x), -1), INCEPTION_FEATURES, path, "inception")
                       .double().cpu().numpy())
    return np.concatenate(out)


def fid(frames_a, frames_b, models_dir: str | os.PathLike, device: str | None = None) -> float:
    """FID between two sets of uint8 (N, H, W, 3) RGB frames."""
    return frechet_distance(inception_features(frames_a, models_dir, device),
                            inception_features(frames_b, models_dir, device))


def _videos(videos) -> list[np.ndarray]:
    """A list of uint8 (T, H, W, 3) videos from one such array or a sequence of them."""
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    result = []
    for video in videos:
        array = np.asarray(video)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"each video must be uint8 (T, H, W, 3) RGB, got {array.dtype} {array.shape}")
        result.append(array)
    return result


def _i3d_clip(clip: np.ndarray) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """(3, T, 224, 224) in [-1, 1]: shorter side to 224 (bilinear), centre crop."""
    import math

    import torch.nn.functional as F

    x = _frames_tensor(clip).float() / 255.0
    h, w = x.shape[-2:]
    scale = I3D_SIDE / min(h, w)
    size = (I3D_SIDE, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), I3D_SIDE)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    top, left = (x.shape[-2] - I3D_SIDE) // 2, (x.shape[-1] - I3D_SIDE) // 2
    x = x[:, :, top:top + I3D_SIDE, left:left + I3D_SIDE]
    return ((x - 0.5) * 2).permute(1, 0, 2, 3).contiguous()


def i3d_features(videos, models_dir: str | os.PathLike, clip_len: int = FVD_CLIP_LEN, device: str | None = None,
                 batch_size: int = 4) -> np.ndarray:
    """(clips, 400) I3D features of every whole `clip_len`-frame clip of each uint8
    (T, H, W, 3) RGB video (a video's last frames short of a clip are left out)."""
    import torch

    device = default_device(device)
    model = load_i3d(models_dir, device)
    path = evaluation_path(models_dir, "i3d")
    clips = [video[start:start + clip_len] for video in _videos(videos)
             for start in range(0, len(video) - clip_len + 1, clip_len)]
    if not clips:
        raise ValueError(f"FVD needs videos of at least {clip_len} frames")
    out = []
    with torch.no_grad():
        for start in range(0, len(clips), batch_size):
            x = torch.stack([_i3d_clip(c) for c in clips[start:start + batch_size]]).to(device)
            features = model(x, rescale=False, resize=False, return_features=True)
            out.append(_check_width(features.reshape(len(x), -1), I3D_FEATURES, path, "i3d").double().cpu().numpy())
    return np.concatenate(out)


def fvd(videos_a, videos_b, models_dir: str | os.PathLike, clip_len: int = FVD_CLIP_LEN,
        device: str | None = None) -> float:
    """FVD between two sets of uint8 (T, H, W, 3) RGB videos, over their `clip_len`-frame clips."""
    return frechet_distance(i3d_features(videos_a, models_dir, clip_len, device),
                            i3d_features(videos_b, models_dir, clip_len, device))


# ---------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1)


def _lpips_modules():
    import torch
    from torch import nn

    class AlexNetFeatures(nn.Module):
        """torchvision's AlexNet `features` stack (same state-dict keys); returns the five ReLU
        outputs LPIPS reads (after layers 1, 4, 7, 9 and 11)."""

        taps = (1, 4, 7, 9, 11)

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )

        def forward(self, x):
            outs = []
            for index, layer in enumerate(self.features[: self.taps[-1] + 1]):
                x = layer(x)
                if index in self.taps:
                    outs.append(x)
            return outs

    class LinearHead(nn.Module):
        """lpips' NetLinLayer: dropout (inactive in eval) and a 1x1 convolution without bias."""

        def __init__(self, channels: int):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    class LinearHeads(nn.Module):
        """The heads as lpips names them (`lin0.model.1.weight` ...)."""

        def __init__(self):
            super().__init__()
            for index, channels in enumerate(LPIPS_CHANNELS):
                setattr(self, f"lin{index}", LinearHead(channels))

        def __iter__(self):
            return iter(getattr(self, f"lin{index}") for index in range(len(LPIPS_CHANNELS)))

    class LPIPSAlex(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = AlexNetFeatures()
            self.heads = LinearHeads()
            self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

        def forward(self, in0, in1):
            """Per-pair distances (N,) of images in [-1, 1]."""
            outs0 = self.net((in0 - self.shift) / self.scale)
            outs1 = self.net((in1 - self.shift) / self.scale)
            total = 0
            for f0, f1, head in zip(outs0, outs1, self.heads):
                f0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
                f1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
                total = total + head.model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
            return total.reshape(-1)

    return AlexNetFeatures, LinearHeads, LPIPSAlex


def alexnet_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the `features.*` part of torchvision's AlexNet state dict."""
    alexnet, _, _ = _lpips_modules()
    return {k: tuple(v.shape) for k, v in alexnet().state_dict().items()}


def lpips_head_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of lpips' v0.1 AlexNet linear-head file."""
    _, heads, _ = _lpips_modules()
    return {k: tuple(v.shape) for k, v in heads().state_dict().items()}


def _state_dict(path: Path, role: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut-short zip or pickle raises several different types
        raise ModelFileError(f"cannot load {path}: not a PyTorch tensor file, or cut short ({type(error).__name__}); "
                             f"download {EVALUATION_FILES[role]['url']} again") from error
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} is not a state dict: download {EVALUATION_FILES[role]['url']} again")
    return state


def _select(state: dict, shapes: dict[str, tuple[int, ...]], path: Path, role: str) -> dict:
    """The entries of `shapes` from `state`; ModelFileError on a missing key or a wrong shape."""
    missing = [k for k in shapes if k not in state]
    wrong = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or wrong:
        what = (f"lacks {len(missing)} key(s), e.g. {missing[0]}" if missing else
                f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, expected {shapes[wrong[0]]}")
        raise ModelFileError(f"{path} {what}: it is not {EVALUATION_FILES[role]['what']}; "
                             f"download {EVALUATION_FILES[role]['url']}")
    return {k: state[k] for k in shapes}


def _lpips_heads(path: Path) -> dict:
    """The linear heads of lpips' file: exactly its five keys (lpips reads it non-strictly,
    so an extra key means another file)."""
    state = _state_dict(path, "lpips_alex")
    extra = sorted(set(state) - set(lpips_head_shapes()))
    if extra:
        raise ModelFileError(f"{path} has unexpected key {extra[0]}: it is not "
                             f"{EVALUATION_FILES['lpips_alex']['what']}; download {EVALUATION_FILES['lpips_alex']['url']}")
    return _select(state, lpips_head_shapes(), path, "lpips_alex")


@lru_cache(maxsize=4)
def _lpips_network(alex_key: tuple[str, int, int], heads_key: tuple[str, int, int], device: str):
    _, _, lpips_alex = _lpips_modules()
    model = lpips_alex()
    alex_path, heads_path = Path(alex_key[0]), Path(heads_key[0])
    model.net.load_state_dict(_select(_state_dict(alex_path, "alexnet"), alexnet_feature_shapes(), alex_path, "alexnet"))
    model.heads.load_state_dict(_lpips_heads(heads_path))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval().to(device)


def load_lpips(models_dir: str | os.PathLike, device: str | None = None):
    """The LPIPS (AlexNet, v0.1) network from MODELS/evaluation (cached per files and device);
    called as `net(x0, x1)` on (N, 3, H, W) images in [-1, 1], it gives (N,) distances."""
    alex = evaluation_path(models_dir, "alexnet")
    heads = evaluation_path(models_dir, "lpips_alex")
    return _lpips_network(_file_key(alex), _file_key(heads), default_device(device))


def lpips(frames_a, frames_b, models_dir: str | os.PathLike, device: str | None = None,
          batch_size: int = 16) -> float:
    """Mean LPIPS over the frame pairs of two uint8 (N, H, W, 3) RGB frame sets of one shape."""
    import torch

    a, b = _frames_tensor(frames_a), _frames_tensor(frames_b)
    if a.shape != b.shape:
        raise ValueError(f"LPIPS compares frame pairs: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    device = default_device(device)
    model = load_lpips(models_dir, device)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(a), batch_size):
            x0 = a[start:start + batch_size].to(device, torch.float32) / 127.5 - 1
            x1 = b[start:start + batch_size].to(device, torch.float32) / 127.5 - 1
            total += float(model(x0, x1).double().sum())
    return total / len(a)


# ---------------------------------------------------------------------------------------------
# Checking the files (`freetalk models check`)


def check_evaluation_file(models_dir: str | os.PathLike, role: str) -> list[str]:
    """Problems of the present evaluation file `role`, one line each (an absent file is none:
    these files are optional)."""
    import torch

    path = Path(models_dir) / EVALUATION_DIR / EVALUATION_FILES[role]["file"]
    if not path.is_file():
        return []
    try:
        with torch.no_grad():
            _check_file(models_dir, role, path)
    except ModelFileError as error:
        return [str(error)]
    except Exception as error:  # a network that loads but cannot run its standard input
        return [f"{path} fails on its standard input ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0][:120] if str(error).strip() else ''}); "
                f"download {EVALUATION_FILES[role]['url']} again"]
    return []


def _check_file(models_dir, role: str, path: Path) -> None:
    """Load `role` and run it on a standard input; ModelFileError when that fails."""
    import torch

    if role == "inception":
        out = load_inception(models_dir, "cpu")(torch.zeros(1, 3, INCEPTION_SIDE, INCEPTION_SIDE),
                                                  return_features=True)
        _check_width(out.reshape(1, -1), INCEPTION_FEATURES, path, role)
    elif role == "i3d":
        out = load_i3d(models_dir, "cpu")(torch.zeros(1, 3, FVD_CLIP_LEN, I3D_SIDE, I3D_SIDE),
                                          rescale=False, resize=False, return_features=True)
        _check_width(out.reshape(1, -1), I3D_FEATURES, path, role)
    elif role == "alexnet":
        _select(_state_dict(path, role), alexnet_feature_shapes(), path, role)
    elif role == "lpips_alex":
        _lpips_heads(path)
    elif role == "syncnet":
        from freetalk_core.evaluation.syncnet import syncnet_state

        syncnet_state(path)
