"""Frame rates, lengths and audio of real-world inputs, on the timing functions themselves:
clips with a flash on known frames and audio with clicks at the same times."""

import wave
from fractions import Fraction

import av
import numpy as np
import pytest

from freetalk_core import video

NTSC = 30000 / 1001


def click_wav(path, rate: int, channels: int, seconds: float, clicks, gains=(0.8, 0.4)):
    """16-bit PCM WAV of `seconds` of silence with 20 ms 1 kHz bursts starting at `clicks` (s);
    channel c at amplitude `gains[c]`."""
    n = int(round(seconds * rate))
    mono = np.zeros(n)
    for start in clicks:
        a, b = int(round(start * rate)), int(round((start + 0.02) * rate))
        mono[a:b] = np.sin(2 * np.pi * 1000 * np.arange(b - a) / rate)
    samples = np.stack([mono * gains[c] for c in range(channels)], axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def flash_frames(n: int, flashes, size: int = 64):
    """`n` grey `(size, size, 3)` frames, each a different shade (no two neighbours alike);
    the frames in `flashes` are white."""
    for k in range(n):
        yield np.full((size, size, 3), 255 if k in flashes else 40 + (k * 37) % 150, np.uint8)


def flash_times(frames, fps: float) -> np.ndarray:
    """Seconds of the first frame of each run of white frames."""
    white = np.array([np.asarray(f).mean() > 240 for f in frames])
    starts = np.flatnonzero(white & ~np.concatenate([[False], white[:-1]]))
    return starts / fps


def click_times(path) -> np.ndarray:
    """Seconds from the start of `path`'s audio to each click onset (first sample above 0.1
    after at least 0.1 s of quiet)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        samples = np.concatenate([f.to_ndarray().reshape(len(stream.layout.channels), -1).mean(0)
                                  for f in container.decode(stream)])
    loud = np.flatnonzero(np.abs(samples) > 0.1)
    if not len(loud):
        return np.zeros(0)
    onsets = loud[np.concatenate([[True], np.diff(loud) > 0.1 * rate])]
    return onsets / rate


def audio_stream(path) -> tuple[int, int, float]:
    """`(sample rate, channels, seconds)` of the output's audio stream, from its decoded samples
    (less the encoder's priming, which the MP4's edit list removes)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return (stream.codec_context.sample_rate, len(stream.layout.channels),
                float(stream.duration * stream.time_base))


def decoded_video(path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


# --------------------------------------------------------------------------------- frame rates
@pytest.mark.parametrize("fps", [30.0, NTSC, 60.0], ids=["30", "29.97", "60"])
def test_output_keeps_the_identity_rate_and_the_lip_reference_audio_in_sync(tmp_path, fps):
    from flows.generate import output_fps

    # The identity at its own rate: the job's rate is the identity's, every frame read once.
    n_identity = int(round(1.5 * fps))
    identity = video.write_video(tmp_path / "identity.mp4", flash_frames(n_identity, ()), fps)
    rate = output_fps(identity)
    assert rate == pytest.approx(fps, rel=1e-6)
    assert Fraction(rate).limit_denominator(1001) == Fraction(fps).limit_denominator(1001)
    read = list(video.read_frames(identity, fps=rate))
    assert len(read) == n_identity
    assert all(np.abs(a.astype(int) - b).mean() > 5 for a, b in zip(read, read[1:]))  # no repeats

    # The lip reference at 25 fps: white frames at 0.32 s and 1.4 s (the last second), clicks then.
    clicks = (0.32, 1.4)
    wav = click_wav(tmp_path / "clicks.wav", 48000, 1, 1.6, clicks)
    lip = video.write_video(tmp_path / "lip.mp4", flash_frames(40, {8, 35}), 25, audio=wav)
    np.testing.assert_allclose(click_times(lip), clicks, atol=0.005)

    # Resampled to the identity's rate and written with the lip reference's audio.
    lip_frames = list(video.read_frames(lip, fps=rate))
    assert len(lip_frames) == video.output_frame_count(1.6, rate)
    out = video.write_video(tmp_path / "out.mp4", iter(lip_frames), rate, audio=lip)
    frames, stream_rate = decoded_video(out)
    assert stream_rate == Fraction(fps).limit_denominator(1001)
    assert len(frames) == len(lip_frames)
    frame = 1 / fps
    seen, heard = flash_times(frames, fps), click_times(out)
    assert len(seen) == len(heard) == 2
    # Within one frame at both marks, the last one 0.2 s before the end: no drift.
    assert np.abs(seen - np.asarray(clicks)).max() <= frame
    assert np.abs(seen - heard).max() <= frame
    _, _, seconds = audio_stream(out)
    assert abs(seconds - len(frames) / fps) <= frame


def test_output_fps_option_overrides_the_identity_rate(tmp_path, tiny_models):
    from flows.generate import make_job, output_fps, stage_keys

    identity = video.write_video(tmp_path / "identity.mp4", flash_frames(30, ()), 30)
    lip = video.write_video(tmp_path / "lip.mp4", flash_frames(25, ()), 25)
    assert output_fps(identity, 25) == 25.0
    with pytest.raises(ValueError, match="fps must be positive"):
        output_fps(identity, 0)
    jobs = {fps: make_job(identity, lip, store=tmp_path / "s", models=tiny_models, fps=fps)
            for fps in (None, 25.0, 30.0)}
    assert jobs[None].fps == pytest.approx(30.0) and jobs[25.0].fps == 25.0
    keys = {fps: stage_keys(job) for fps, job in jobs.items()}
    # The same item either way; every stage is keyed by the rate it was made at.
    assert len({job.item_id for job in jobs.values()}) == 1
    assert keys[None] == keys[30.0]
    assert all(keys[25.0][stage] != keys[30.0][stage] for stage in keys[30.0])


def offset_clip(path, video_start: float, audio_start: float, mark: float = 0.6):
    """25 fps 64x64 MP4 (1 s) whose video starts at `video_start` s and its audio at
    `audio_start` s (presentation times), with a white frame and a click both shown at `mark` s."""
    with av.open(str(path), "w", format="mp4") as out:
        v = out.add_stream("libx264", rate=25)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=48000, layout="mono")
        first = int(round(video_start * 25))
        for k, frame in enumerate(flash_frames(25, {int(round(mark * 25)) - first})):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = first + k, Fraction(1, 25)
            out.mux(v.encode(f))
        out.mux(v.encode(None))
        samples = np.zeros(48000, np.float32)
        click = int(round((mark - audio_start) * 48000))
        samples[click:click + 960] = np.sin(2 * np.pi * 1000 * np.arange(960) / 48000)
        pts = int(round(audio_start * 48000))
        for start in range(0, len(samples), 1024):
            f = av.AudioFrame.from_ndarray(samples[None, start:start + 1024].copy(), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = 48000, pts + start, Fraction(1, 48000)
            out.mux(a.encode(f))
        out.mux(a.encode(None))
    return path


@pytest.mark.parametrize("video_start, audio_start", [(0.2, 0.0), (0.0, 0.2)],
                         ids=["video-starts-late", "audio-starts-late"])
def test_audio_that_starts_apart_from_the_video_stays_in_sync(tmp_path, video_start, audio_start):
    lip = offset_clip(tmp_path / "lip.mp4", video_start, audio_start)
    assert video.audio_lead(lip) == pytest.approx(audio_start - video_start, abs=0.03)
    frames = list(video.read_frames(lip, fps=25))
    seen = flash_times(frames, 25)  # from the first video frame, as every stage counts
    assert seen == pytest.approx([0.6 - video_start])
    out = video.write_video(tmp_path / "out.mp4", iter(frames), 25, audio=lip)
    assert np.abs(click_times(out) - seen).max() <= 1 / 25


# ------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("n_source, n_out", [(2, 9), (5, 23), (12, 40), (40, 12), (7, 7)])
def test_pingpong_loops_without_a_jump_and_trims_a_longer_source(n_source, n_out):
    index = video.pingpong_indices(n_source, n_out)
    assert len(index) == n_out and index.min() >= 0 and index.max() < n_source
    if n_out <= n_source:  # a longer identity is trimmed: its first n_out frames
        np.testing.assert_array_equal(index, np.arange(n_out))
    else:  # every step goes to a neighbouring frame, turns included: no jump, no frozen frame
        assert set(np.abs(np.diff(index)).tolist()) == {1}
        assert index.max() == n_source - 1


# --------------------------------------------------------------------------------------- audio
@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_audio_at_any_rate_and_layout_gives_correct_output_audio(tmp_path, rate, channels):
    clicks = (0.25, 1.25)
    wav = click_wav(tmp_path / "a.wav", rate, channels, 1.5, clicks)
    # 1.6 s of video: the 1.5 s of audio is padded with silence to the video's length.
    out = video.write_video(tmp_path / "out.mp4", flash_frames(40, ()), 25, audio=wav)
    out_rate, out_channels, seconds = audio_stream(out)
    assert out_rate == video.AUDIO_RATE and out_channels == channels
    assert seconds == pytest.approx(1.6, abs=1 / 25)
    assert video.audio_duration(out) == pytest.approx(1.6, abs=1 / 25)
    np.testing.assert_allclose(click_times(out), clicks, atol=0.005)
    with av.open(str(out)) as container:
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    burst = samples[:, int(1.25 * video.AUDIO_RATE):int(1.27 * video.AUDIO_RATE)]
    if channels == 2:  # left and right keep their own levels (0.8 and 0.4)
        assert np.abs(burst[0]).max() == pytest.approx(0.8, abs=0.1)
        assert np.abs(burst[1]).max() == pytest.approx(0.4, abs=0.1)
    assert np.abs(samples[:, int(1.35 * video.AUDIO_RATE):]).max() < 0.01  # padding is silence


def test_no_audio_gives_a_video_only_output(tmp_path):
    out = video.write_video(tmp_path / "out.mp4", flash_frames(10, ()), 25, audio=None)
    with av.open(str(out)) as container:
        assert not container.streams.audio and len(container.streams.video) == 1
