"""Video and audio I/O with PyAV: probe, constant-fps decoding, H.264 encoding with muxed audio.

Frames are RGB uint8 arrays `(H, W, 3)`. Decoding resamples any input to a constant frame rate
by timestamp: output frame `k` is the source frame on screen at time `k / fps`.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import av
import numpy as np

from freetalk_core import DEFAULT_FPS
from freetalk_core.errors import VideoReadError

AUDIO_RATE = 48000
"""Sample rate of the AAC track written by `write_video`; 1024-sample AAC frames are 21 ms at it."""

SEEK_AHEAD_FRAMES = 50
"""`read_frames` with indices seeks, rather than decodes, to an index more than this far ahead."""
_TIME_EPS = 1e-3
"""Seconds of slack when comparing a frame timestamp with an output time (timestamp rounding)."""


@dataclass
class VideoInfo:
    """What `probe` reports about a video file. `duration` is in seconds, `fps` is the source's."""

    width: int
    height: int
    fps: float
    n_frames: int
    duration: float
    has_audio: bool


def _read_error(path, reason) -> VideoReadError:
    return VideoReadError(
        f"cannot read {path}: {reason}; check that it is a whole video file FFmpeg can decode "
        f"(e.g. H.264 MP4), or export it again")


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's words for an error, without its errno and the path repeated."""
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror).rstrip(".").lower()
    if isinstance(exc, UnicodeDecodeError):
        return "its header holds unreadable text (the file is corrupt)"
    return str(exc)


def _open(path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot read {path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise VideoReadError(f"cannot read {path}: the file is empty (0 bytes); copy or export it again")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, _ffmpeg_reason(exc)) from None


def _video_stream(container, path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        container.close()
        raise _read_error(path, "it has no video stream (an audio-only file?)")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise _read_error(path, "its video stream has no decoder (unknown codec or a corrupt header)")
    return stream


def _stream_rate(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _packet_extent(container, stream) -> tuple[int, float]:
    """`(packets, seconds)` of a stream from its packets' timestamps, without decoding."""
    count, first, end = 0, None, None
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue
        count += 1
        start = packet.pts * packet.time_base
        stop = start + (packet.duration or 0) * packet.time_base
        first = start if first is None else min(first, start)
        end = stop if end is None else max(end, stop)
    return count, float(end - first) if count else 0.0


def probe(path) -> VideoInfo:
    """Size, frame rate, frame count, duration (s) and audio presence of a video file."""
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise _read_error(path, "its video stream has no frame size")
        fps = _stream_rate(stream)
        if stream.frames > 0 and stream.duration:
            n_frames, duration = stream.frames, float(stream.duration * stream.time_base)
        else:
            n_frames, duration = _packet_extent(container, stream)
            if fps and duration < n_frames / fps:
                duration = n_frames / fps
        if n_frames == 0:
            raise _read_error(path, "its video stream has no frames")
        if not fps:
            fps = n_frames / duration
        return VideoInfo(width=width, height=height, fps=fps, n_frames=n_frames,
                         duration=duration, has_audio=bool(container.streams.audio))
    except av.error.FFmpegError as exc:
        raise _read_error(path, _ffmpeg_reason(exc)) from None
    finally:
        container.close()


def check_video(path) -> VideoInfo:
    """`probe(path)`, after checking the file is whole: every frame its header lists is in the
    file (a cut-off download or copy is not), and its first frame decodes. Reads the packets
    once without decoding them. Raises `VideoReadError` saying what is wrong and what to do."""
    info = probe(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        listed = stream.frames
        if listed > 0:
            present = sum(1 for packet in container.demux(stream) if packet.size)
            if present < listed:
                raise VideoReadError(
                    f"cannot read {path}: the file is truncated (its header lists {listed} frames, the "
                    f"file holds {present}); copy, download or export it again")
    except av.error.FFmpegError as exc:
        raise _read_error(path, _ffmpeg_reason(exc)) from None
    finally:
        container.close()
    frames = read_frames(path, fps=info.fps, indices=[0])
    try:
        next(frames)
    finally:
        frames.close()
    return info


def output_frame_count(duration_s: float, fps: float = DEFAULT_FPS) -> int:
    """Frames at `fps` that cover `duration_s` seconds: `round(duration_s * fps)`."""
    return int(round(duration_s * fps))


def _decoded_frames(path, from_seconds: float = 0.0) -> Iterator[tuple[float, av.VideoFrame]]:
    """`(seconds from the first frame, frame)` for the decoded frames of the first video stream:
    all of them, or with `from_seconds > 0` those from the keyframe at or before that time
    (FFmpeg's seek; the first frame is decoded once to know where the clip starts)."""
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        rate = _stream_rate(stream) or DEFAULT_FPS
        frames = container.decode(stream)
        start, last = None, None
        if from_seconds > 0:
            first = next(frames, None)
            if first is None or first.pts is None:
                from_seconds = 0.0
                frames = container.decode(stream) if first is None else iter([first, *frames])
            else:
                start = float(first.pts * first.time_base)
                container.seek(int((start + from_seconds) / stream.time_base), stream=stream,
                               backward=True, any_frame=False)
                frames = container.decode(stream)
        for frame in frames:
            if frame.pts is not None:
                t = float(frame.pts * frame.time_base)
            else:
                t = (last if last is not None else (start or 0.0)) + 1.0 / rate
            if start is None:
                start = t
            last = t
            yield t - start, frame
    except av.error.FFmpegError as exc:
        raise _read_error(path, _ffmpeg_reason(exc)) from None
    finally:
        container.close()


def _resampled(path, fps: float, n_out: int, first: int = 0) -> Iterator[tuple[int, "_Shown"]]:
    """`(k, shown)` for k = first..n_out-1: the source frame on screen at time k / fps. From
    `first > 0`, decoding seeks to a keyframe before frame `first` instead of starting at the
    clip's beginning (further back when the seek lands after it)."""
    back = 0.0
    while True:
        seek = max(0.0, first / fps - back) if first > 0 else 0.0
        k, shown, late = first, None, False
        for t, frame in _decoded_frames(path, seek):
            if shown is None and seek > 0 and t > first / fps + _TIME_EPS:
                late = True
                break
            if shown is None:
                shown = _Shown(frame)
            while k < n_out and t > k / fps + _TIME_EPS:
                yield k, shown
                k += 1
            if k >= n_out:
                return
            shown = _Shown(frame)
        if late or (shown is None and seek > 0):
            # The seek landed after the frame (or nowhere): from further back, at worst from 0.
            back = 2 * back + 1.0
            continue
        if shown is None:
            raise _read_error(path, "no frame could be decoded")
        while k < n_out:
            yield k, shown
            k += 1
        return


class _Shown:
    """A decoded frame, converted to RGB once and only if it is used."""

    def __init__(self, frame: av.VideoFrame):
        self.frame, self.rgb = frame, None

    def array(self) -> np.ndarray:
        if self.rgb is None:
            self.rgb = self.frame.to_ndarray(format="rgb24")
            self.frame = None
        return self.rgb


def read_frames(path, fps: float = DEFAULT_FPS,
                indices: Sequence[int] | np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Decode `path` at a constant `fps`, yielding `(H, W, 3) uint8` RGB frames.

    The clip gives `output_frame_count(probe(path).duration, fps)` frames; frame `k` is the source
    frame shown at time `k / fps`. With `indices`, only those output frames are yielded, in the
    given order (repeats allowed; a decreasing or far-ahead index seeks). Streams: holds at most
    the frame on screen, never the whole video.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    n_out = max(1, output_frame_count(probe(path).duration, fps))
    if indices is None:
        for _, shown in _resampled(path, fps, n_out):
            yield shown.array()
        return
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(wanted) and (wanted.min() < 0 or wanted.max() >= n_out):
        raise ValueError(f"indices must lie in [0, {n_out}) for {path} at {fps} fps")
    frames, k, shown = None, -1, None
    for index in wanted:
        if frames is None or index < k or index > k + SEEK_AHEAD_FRAMES:
            # Backwards, or far ahead: seek near the frame rather than decode up to it.
            if frames is not None:
                frames.close()
            frames, k, shown = _resampled(path, fps, n_out, int(index)), int(index) - 1, None
        while k < index:
            k, shown = next(frames)
        yield shown.array()
    if frames is not None:
        frames.close()


def read_video(path, fps: float = DEFAULT_FPS, max_frames: int | None = None) -> np.ndarray:
    """All frames of `path` at `fps` (at most `max_frames`) as `(T, H, W, 3) uint8`."""
    frames = []
    for frame in read_frames(path, fps):
        if max_frames is not None and len(frames) >= max_frames:
            break
        frames.append(frame)
    return np.stack(frames)


def pingpong_indices(n_source: int, n_out: int) -> np.ndarray:
    """`(n_out,) int64` source indices 0..n-1, n-2..0, 1..n-1, ...: reuse a clip forward then back."""
    if n_source < 1:
        raise ValueError(f"n_source must be at least 1, got {n_source}")
    if n_source == 1:
        return np.zeros(n_out, dtype=np.int64)
    period = 2 * n_source - 2
    phase = np.arange(n_out, dtype=np.int64) % period
    return np.where(phase < n_source, phase, period - phase)


def has_audio(path) -> bool:
    """Whether the file has at least one audio stream."""
    container = _open(path)
    try:
        return bool(container.streams.audio)
    finally:
        container.close()


def _audio_frames(path) -> Iterator[av.AudioFrame]:
    container = _open(path)
    try:
        if not container.streams.audio:
            raise _read_error(path, "it has no audio stream")
        yield from container.decode(container.streams.audio[0])
    except av.error.FFmpegError as exc:
        raise _read_error(path, _ffmpeg_reason(exc)) from None
    finally:
        container.close()


def read_audio(path, sample_rate: int = 16000) -> np.ndarray:
    """`(n,)` float32 mono samples of the first audio stream of `path` at `sample_rate`, from
    its first sample."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    blocks = []
    for frame in _audio_frames(path):
        frame.pts = None
        blocks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    blocks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(blocks).astype(np.float32) if blocks else np.zeros(0, np.float32)


def audio_duration(path) -> float:
    """Seconds of audio in the first audio stream.

    MP4/MOV: the stream's duration, which its edit list makes exact (decoding would count the
    AAC encoder's padding of the last frame). Other containers: counted from the decoded samples
    (MPEG-PS stores only the last packet's start).
    """
    container = _open(path)
    try:
        if not container.streams.audio:
            raise _read_error(path, "it has no audio stream")
        stream = container.streams.audio[0]
        if "mov" in container.format.name and stream.duration:
            return float(stream.duration * stream.time_base)
    finally:
        container.close()
    samples, rate = 0, None
    for frame in _audio_frames(path):
        samples += frame.samples
        rate = frame.sample_rate
    if not rate:
        raise _read_error(path, "its audio stream has no samples")
    return samples / rate


def _even_frame(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """`frame` as contiguous `(H', W', 3) uint8` with H', W' even (edge-replicated padding)."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if size is not None and frame.shape[:2] != size:
        raise ValueError(f"all frames must have the same size: {frame.shape[:2]} after {size}")
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def _encode_video(path: Path, frames: Iterable[np.ndarray], rate: Fraction, crf: int,
                  metadata: dict[str, str] | None = None) -> int:
    """Write `frames` as H.264 (yuv420p) to a video-only MP4; returns the frame count."""
    n, size = 0, None
    with av.open(str(path), "w", format="mp4") as out:
        out.metadata.update(metadata or {})
        stream = None
        for frame in frames:
            if stream is None:
                size = np.asarray(frame).shape[:2]
                even = _even_frame(frame, None)
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height = even.shape[1], even.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = 1 / rate
                stream.options = {"crf": str(crf)}
            else:
                even = _even_frame(frame, size)
            video_frame = av.VideoFrame.from_ndarray(even, format="rgb24")
            video_frame.pts, video_frame.time_base = n, 1 / rate
            out.mux(stream.encode(video_frame))
            n += 1
        if stream is None:
            raise ValueError("write_video needs at least one frame")
        out.mux(stream.encode(None))
    return n


def _first_time(path, kind: str) -> float | None:
    """Presentation time (s) of the first decoded `kind` ("video" or "audio") frame of `path`;
    None when it has no such stream or no timestamps."""
    container = _open(path)
    try:
        streams = container.streams.video if kind == "video" else container.streams.audio
        if not streams:
            return None
        for frame in container.decode(streams[0]):
            return None if frame.pts is None else float(frame.pts * frame.time_base)
        return None
    except av.error.FFmpegError:
        return None
    finally:
        container.close()


def audio_lead(path) -> float:
    """Seconds from the first video frame of `path` to its first audio sample (negative when
    the audio starts first; 0 for a file without video). `read_frames` counts time from the
    first video frame, so the audio is shifted by this much to stay in sync with it."""
    video_start, audio_start = _first_time(path, "video"), _first_time(path, "audio")
    return 0.0 if video_start is None or audio_start is None else audio_start - video_start


def _audio_blocks(path, n_samples: int, layout: str) -> Iterator[np.ndarray]:
    """Exactly `n_samples` of `path`'s audio at AUDIO_RATE, `(C, n) float32` blocks, starting at
    the time of its first video frame (`audio_lead`: silence before audio that starts later,
    audio before the first frame left out), silence-padded at the end."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=AUDIO_RATE)
    channels = 1 if layout == "mono" else 2
    lead = int(round(audio_lead(path) * AUDIO_RATE))

    def resampled():
        for frame in _audio_frames(path):
            frame.pts = None
            yield from resampler.resample(frame)
        yield from resampler.resample(None)

    def silence(count):
        for start in range(0, count, 1024):
            yield np.zeros((channels, min(1024, count - start)), np.float32)

    def shifted():
        yield from silence(max(0, lead))
        drop = max(0, -lead)
        for frame in resampled():
            block = frame.to_ndarray()
            if drop:
                cut = min(drop, block.shape[1])
                block, drop = block[:, cut:], drop - cut
            if block.shape[1]:
                yield block

    written = 0
    for block in shifted():
        take = min(block.shape[1], n_samples - written)
        if take <= 0:
            break
        yield block[:, :take]
        written += take
    yield from silence(n_samples - written)


def _audio_packets(path, stream, n_samples: int, layout: str) -> Iterator[av.Packet]:
    """AAC packets of `path`'s audio cut or padded to `n_samples` at AUDIO_RATE."""
    pts = 0
    for block in _audio_blocks(path, n_samples, layout):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32), format="fltp",
                                           layout=layout)
        frame.sample_rate = AUDIO_RATE
        frame.pts, frame.time_base = pts, Fraction(1, AUDIO_RATE)
        pts += frame.samples
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _packet_seconds(packet: av.Packet) -> float:
    return float((packet.dts if packet.dts is not None else packet.pts or 0) * packet.time_base)


def _mux_audio(video_path: Path, audio_path, out_path: Path, n_frames: int, rate: Fraction,
               metadata: dict[str, str] | None = None) -> None:
    """Copy the video of `video_path` and add `audio_path`'s audio as AAC, cut to the video."""
    n_samples = int(round(n_frames / rate * AUDIO_RATE))
    container = _open(audio_path)
    try:
        if not container.streams.audio:
            raise _read_error(audio_path, "it has no audio stream")
        channels = container.streams.audio[0].codec_context.channels or 2
    finally:
        container.close()
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(video_path)) as source, av.open(str(out_path), "w", format="mp4") as out:
        out.metadata.update(metadata or {})
        video_in = source.streams.video[0]
        video_out = out.add_stream_from_template(video_in)
        audio_out = out.add_stream("aac", rate=AUDIO_RATE, layout=layout)
        audio_out.bit_rate = 128000
        audio = _audio_packets(audio_path, audio_out, n_samples, layout)
        pending = next(audio, None)
        for packet in source.demux(video_in):
            if packet.dts is None:
                continue
            # Interleave by time so players can stream the file from the start.
            while pending is not None and _packet_seconds(pending) <= _packet_seconds(packet):
                out.mux(pending)
                pending = next(audio, None)
            packet.stream = video_out
            out.mux(packet)
        while pending is not None:
            out.mux(pending)
            pending = next(audio, None)


def write_video(path, frames: Iterable[np.ndarray], fps: float, audio=None, crf: int = 18,
                metadata: dict[str, str] | None = None) -> Path:
    """Encode `frames` (`(H, W, 3) uint8` RGB, one size) as an H.264 MP4 at a constant `fps`.

    Odd sizes are padded to even by edge replication. `audio` is a file with an audio stream
    (video or audio) or None; it is re-encoded to AAC, starting at the time of that file's first
    video frame (`audio_lead`), and cut or silence-padded to the video's duration
    `n_frames / fps`. `metadata`: container tags (FFmpeg's MP4 muxer keeps the standard ones:
    title, comment, description, encoder, ...). Written to a temporary file in the same folder,
    then renamed.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    if audio is not None and not has_audio(audio):
        raise VideoReadError(f"{audio} has no audio stream; pass a file with audio or none")
    # A unique name per call, created by FFmpeg with the user's usual permissions.
    video_tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.video.mp4")
    muxed_tmp = video_tmp.with_suffix(".muxed.mp4")
    try:
        n = _encode_video(video_tmp, frames, rate, crf, metadata)
        if audio is None:
            os.replace(video_tmp, path)
        else:
            _mux_audio(video_tmp, audio, muxed_tmp, n, rate, metadata)
            os.replace(muxed_tmp, path)
    finally:
        for leftover in (video_tmp, muxed_tmp):
            leftover.unlink(missing_ok=True)
    return path


def media_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's encoded media: every audio and video packet's bytes in order,
    without the container's metadata (tags, a C2PA manifest). Two files with the same media
    hash decode to the same frames and samples."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(*[s for s in container.streams if s.type in ("video", "audio")]):
                if packet.size:
                    digest.update(packet.stream.type.encode())
                    digest.update(bytes(packet))
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"cannot read {path}: {exc} (is it a video file?)") from None
    return digest.hexdigest()
