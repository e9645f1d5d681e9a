"""LSE-D and LSE-C: lip-sync error distance and confidence with SyncNet (Wav2Lip's protocol,
the scoring of joonson/syncnet_python's `SyncNetInstance.evaluate`).

File: MODELS/evaluation/syncnet_v2.model, syncnet_python's state dict of its `S` network
(ported here with the same keys; the file has no BatchNorm `num_batches_tracked` counters).
It is read as syncnet_python's `loadParameters` reads it: each tensor copied into the network's
own state.

Protocol (`lse`):

1. Video at 25 fps: frame k of the output shows the input frame nearest to time k / 25 s (what
   `ffmpeg -r 25`, used by syncnet_python's `run_pipeline`, does); unchanged at 25 fps.
2. Each face crop resized to 224 x 224 (bilinear, OpenCV's default as in syncnet_python's crop
   step), in BGR channel order and [0, 255] as `cv2.imread` gives it to the network; windows of
   5 consecutive frames go to the lip tower.
3. Audio at 16 kHz (polyphase resampling where the rate differs), as 16-bit PCM values;
   `python_speech_features.mfcc` with its defaults (25 ms windows every 10 ms: 100 Hz,
   13 coefficients); windows of 20 MFCC frames (0.2 s) every 4 (one video frame) go to the
   audio tower.
4. `min_length = min(frames, floor(samples / 640))` and `min_length - 5` windows of each.
5. For every video window, the pairwise distances (`torch.nn.functional.pairwise_distance`) to
   the audio windows shifted by -15..15 (the audio features zero-padded by 15 at both ends),
   averaged over the windows per shift: LSE-D is the smallest mean distance (syncnet_python's
   `minval`), LSE-C the median over shifts minus that minimum (`conf`), the offset
   `15 - argmin` in frames.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from freetalk_core.errors import ModelFileError
from freetalk_core.evaluation.networks import _file_key, _state_dict, _unusable, default_device
from freetalk_core.models.layout import EVALUATION_FILES, evaluation_path

SYNCNET_FPS = 25
SYNCNET_RATE = 16000
SYNCNET_SIDE = 224
WINDOW_FRAMES = 5
MFCC_WINDOW = 20
MFCC_PER_FRAME = 4
VSHIFT = 15
EMBEDDING = 1024


def _syncnet_class():
    from torch import nn

    class SyncNetS(nn.Module):
        """syncnet_python's `S`: an audio tower on 13 x 20 MFCC windows and a lip tower on 5-frame
        224 x 224 colour windows, each giving a 1024-d embedding."""

        def __init__(self, num_layers_in_fc_layers: int = EMBEDDING):
            super().__init__()
            self.netcnnaud = nn.Sequential(
                nn.Conv2d(1, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
                nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
                nn.Conv2d(64, 192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
                nn.BatchNorm2d(192), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
                nn.Conv2d(192, 384, kernel_size=(3, 3), padding=(1, 1)),
                nn.BatchNorm2d(384), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=(3, 3), padding=(1, 1)),
                nn.BatchNorm2d(256), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=(3, 3), padding=(1, 1)),
                nn.BatchNorm2d(256), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
                nn.Conv2d(256, 512, kernel_size=(5, 4), padding=(0, 0)),
                nn.BatchNorm2d(512), nn.ReLU(),
            )
            self.netfcaud = nn.Sequential(
                nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_layers_in_fc_layers),
            )
            self.netfclip = nn.Sequential(
                nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_layers_in_fc_layers),
            )
            self.netcnnlip = nn.Sequential(
                nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),
                nn.BatchNorm3d(96), nn.ReLU(inplace=True),
                nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
                nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
                nn.BatchNorm3d(256), nn.ReLU(inplace=True),
                nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                nn.BatchNorm3d(256), nn.ReLU(inplace=True),
                nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                nn.BatchNorm3d(256), nn.ReLU(inplace=True),
                nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                nn.BatchNorm3d(256), nn.ReLU(inplace=True),
                nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
                nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0),
                nn.BatchNorm3d(512), nn.ReLU(inplace=True),
            )

        def forward_aud(self, x):
            mid = self.netcnnaud(x)
            return self.netfcaud(mid.view((mid.size()[0], -1)))

        def forward_lip(self, x):
            mid = self.netcnnlip(x)
            return self.netfclip(mid.view((mid.size()[0], -1)))

    return SyncNetS


def syncnet_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of syncnet_v2.model: the network's state without BatchNorm counters."""
    state = _syncnet_class()().state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def syncnet_state(path: Path) -> dict:
    """The state dict of a SyncNet file with every key and shape of syncnet_v2.model (and no
    other key but BatchNorm counters); ModelFileError otherwise."""
    state = _state_dict(path, "syncnet")
    shapes = syncnet_shapes()
    what = EVALUATION_FILES["syncnet"]
    extra = sorted(k for k in state if k not in shapes and not k.endswith("num_batches_tracked"))
    missing = sorted(set(shapes) - set(state))
    wrong = sorted(k for k in shapes if k in state and tuple(state[k].shape) != shapes[k])
    if extra or missing or wrong:
        problem = (f"has unexpected key {extra[0]}" if extra else f"lacks {len(missing)} key(s), e.g. {missing[0]}"
                   if missing else f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, expected {shapes[wrong[0]]}")
        raise ModelFileError(f"{path} {problem}: it is not {what['what']}; download {what['url']}")
    return state


@lru_cache(maxsize=4)
def _syncnet(key: tuple[str, int, int], device: str):
    path = Path(key[0])
    state = syncnet_state(path)
    model = _syncnet_class()()
    own = model.state_dict()
    try:
        for name, param in state.items():
            own[name].copy_(param)
    except RuntimeError as error:
        raise _unusable(path, "syncnet", error) from error
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval().to(device)


def load_syncnet(models_dir: str | os.PathLike, device: str | None = None):
    """SyncNet from MODELS/evaluation/syncnet_v2.model (cached per file and device)."""
    path = evaluation_path(models_dir, "syncnet")
    return _syncnet(_file_key(path), default_device(device))


def resample_frames(frames: np.ndarray, fps: float, target: float = SYNCNET_FPS) -> np.ndarray:
    """`frames` retimed to `target` fps: output frame k is the input frame nearest k / target s."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if abs(fps - target) < 1e-6:
        return frames
    count = max(1, int(round(len(frames) * target / fps)))
    index = np.minimum(np.floor(np.arange(count) * fps / target + 0.5).astype(np.int64), len(frames) - 1)
    return frames[index]


def pcm16_at_16k(audio, sample_rate: int) -> np.ndarray:
    """Mono float samples (full scale +-1) as int16 PCM at 16 kHz."""
    from scipy.signal import resample_poly

    samples = np.asarray(audio, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"audio must be mono 1-D samples, got shape {samples.shape}")
    rate = int(round(sample_rate))
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    if rate != SYNCNET_RATE:
        g = math.gcd(SYNCNET_RATE, rate)
        samples = resample_poly(samples, SYNCNET_RATE // g, rate // g)
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def mfcc(pcm16: np.ndarray) -> np.ndarray:
    """(13, T) MFCC at 100 Hz of 16 kHz int16 PCM, as syncnet_python computes it."""
    import python_speech_features

    return np.stack([np.array(c) for c in zip(*python_speech_features.mfcc(pcm16, SYNCNET_RATE))])


def _faces_bgr(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, 224, 224, 3) BGR of uint8 RGB face crops."""
    import cv2

    return np.stack([cv2.resize(np.ascontiguousarray(frame[:, :, ::-1]), (SYNCNET_SIDE, SYNCNET_SIDE))
                     for frame in frames])


def _lip_windows(faces: np.ndarray, starts: range) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """(windows, 3, 5, 224, 224) float in [0, 255]: the 5 frames from each start."""
    import torch

    windows = np.stack([faces[v:v + WINDOW_FRAMES] for v in starts])  # N x 5 x H x W x 3
    return torch.from_numpy(windows).permute(0, 4, 1, 2, 3).float()


def sync_distances(video_features, audio_features, vshift: int = VSHIFT):
    """(windows, 2 * vshift + 1) distances of each video window to the audio windows shifted by
    -vshift..vshift (zero features beyond the ends), as syncnet_python's `calc_pdist`."""
    import torch
    import torch.nn.functional as F

    padded = F.pad(audio_features, (0, 0, vshift, vshift))
    count = len(video_features)
    return torch.stack([F.pairwise_distance(video_features, padded[shift:shift + count])
                        for shift in range(2 * vshift + 1)], dim=1)


def lse(face_frames, fps: float, audio, sample_rate: int, models_dir: str | os.PathLike,
        device: str | None = None, batch_size: int = 20, vshift: int = VSHIFT) -> dict:
    """LSE-D, LSE-C and the audio-video offset (in 25 fps frames) of uint8 (T, H, W, 3) RGB face
    crops shown at `fps` and mono float `audio` at `sample_rate`.

    Returns {"LSE_D": float, "LSE_C": float, "offset": int}. Raises ValueError when the video or
    audio is shorter than six frames (0.24 s): the protocol needs one 5-frame window past the
    last, and ModelFileError when syncnet_v2.model is absent or not SyncNet.
    """
    import torch

    frames = np.asarray(face_frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"face frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
    device = default_device(device)
    model = load_syncnet(models_dir, device)
    frames = resample_frames(frames, fps)
    pcm = pcm16_at_16k(audio, sample_rate)
    min_length = min(len(frames), len(pcm) // (SYNCNET_RATE // SYNCNET_FPS))
    last = min_length - WINDOW_FRAMES
    if last < 1:
        raise ValueError(f"lip sync needs at least {WINDOW_FRAMES + 1} frames (0.24 s) of face video and audio; "
                         f"got {len(frames)} frames at 25 fps and {len(pcm) / SYNCNET_RATE:.2f} s of audio")
    faces = _faces_bgr(frames[:min_length])
    cepstra = torch.from_numpy(mfcc(pcm).astype(np.float32))[None, None]
    video_features, audio_features = [], []
    with torch.no_grad():
        for start in range(0, last, batch_size):
            span = range(start, min(last, start + batch_size))
            lips = _lip_windows(faces, span).to(device)
            video_features.append(model.forward_lip(lips).cpu())
            sounds = torch.cat([cepstra[:, :, :, v * MFCC_PER_FRAME:v * MFCC_PER_FRAME + MFCC_WINDOW] for v in span])
            audio_features.append(model.forward_aud(sounds.to(device)).cpu())
    return sync_scores(sync_distances(torch.cat(video_features), torch.cat(audio_features), vshift), vshift)


def sync_scores(dists, vshift: int = VSHIFT) -> dict:
    """LSE-D, LSE-C and offset from `sync_distances`: the per-shift mean over windows, its
    minimum, the median minus the minimum, and `vshift` minus the best shift's index."""
    import torch

    mean = torch.as_tensor(dists).mean(0)
    minval, minidx = torch.min(mean, 0)
    return {"LSE_D": float(minval), "LSE_C": float(torch.median(mean) - minval), "offset": int(vshift - minidx)}
