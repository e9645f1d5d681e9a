import av
import numpy as np
import pytest

from freetalk_core import video
from freetalk_core.errors import VideoReadError


@pytest.mark.parametrize(
    "name, size, n_frames, audio",
    [
        ("MimicTalk__May_5s.mp4", (512, 512), 125, True),  # H.264 + AAC
        ("LatentSync__demo1_video.mp4", (1080, 1920), 250, True),  # HEVC, tall
        ("LipNet__bbaf2n.mpg", (360, 288), 75, True),  # MPEG-1 + MP2, no frame count in header
        ("EDTalk__mouth_source.mp4", (256, 256), 250, False),  # no audio stream
    ],
)
def test_probe_and_decode_each_container(samples_dir, name, size, n_frames, audio):
    path = samples_dir / name
    info = video.probe(path)
    assert (info.width, info.height) == size
    assert info.fps == pytest.approx(25.0)
    assert info.n_frames == n_frames
    assert info.duration == pytest.approx(n_frames / 25.0, abs=1e-3)
    assert info.has_audio is audio and video.has_audio(path) is audio
    frames = video.read_video(path, max_frames=3)
    assert frames.shape == (3, size[1], size[0], 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # real picture content, not a blank buffer


def test_25fps_source_decodes_every_frame_once(samples_dir):
    path = samples_dir / "LipNet__bbaf2n.mpg"
    frames = list(video.read_frames(path))
    assert len(frames) == 75
    # consecutive frames differ: no duplicates or drops when rates match
    diffs = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])]
    assert min(diffs) > 0


def test_30fps_clip_is_resampled_by_timestamp(samples_dir):
    path = samples_dir / "VideoRetalking__face_4.mp4"
    info = video.probe(path)
    assert info.fps == pytest.approx(30.0) and info.n_frames == 199
    native = video.read_video(path, fps=30.0)
    assert len(native) == 199
    at25 = video.read_video(path, fps=25.0)
    assert len(at25) == video.output_frame_count(199 / 30, 25) == 166
    # frame k at 25 fps is the source frame shown at k/25 s: floor(k * 30 / 25)
    for k in (0, 1, 5, 6, 77, 165):
        np.testing.assert_array_equal(at25[k], native[(k * 6) // 5])


def test_read_frames_indices_any_order(samples_dir):
    path = samples_dir / "LipNet__bbaf2n.mpg"
    frames = video.read_video(path)
    wanted = [3, 3, 10, 2, 74, 0]
    picked = list(video.read_frames(path, indices=wanted))
    assert len(picked) == len(wanted)
    for k, frame in zip(wanted, picked):
        np.testing.assert_array_equal(frame, frames[k])
    with pytest.raises(ValueError, match="indices"):
        list(video.read_frames(path, indices=[75]))


def test_output_frame_count():
    assert video.output_frame_count(5.0, 25) == 125
    assert video.output_frame_count(6.6333, 25) == 166
    assert video.output_frame_count(2.0, 30) == 60


def test_pingpong_indices():
    np.testing.assert_array_equal(video.pingpong_indices(4, 12),
                                  [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1])
    np.testing.assert_array_equal(video.pingpong_indices(5, 3), [0, 1, 2])
    np.testing.assert_array_equal(video.pingpong_indices(1, 4), [0, 0, 0, 0])
    assert video.pingpong_indices(3, 7).dtype == np.int64
    with pytest.raises(ValueError):
        video.pingpong_indices(0, 3)


def _ramp_frames(n, h, w):
    """Distinct frames: a moving bar over a gradient, so frame order is checkable."""
    base = np.linspace(0, 200, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    for i in range(n):
        frame = base.copy()
        frame[:, (i * 3) % w] = 255
        yield frame.astype(np.uint8)


def _stream_seconds(path, kind):
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        return float(stream.duration * stream.time_base), stream.codec_context.name


def test_write_video_round_trip_odd_size(tmp_path):
    out = tmp_path / "sub" / "out.mp4"
    video.write_video(out, _ramp_frames(125, 101, 75), fps=25)
    info = video.probe(out)
    assert (info.width, info.height) == (76, 102)  # padded to even
    assert info.n_frames == 125 and info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(5.0, abs=1e-6)
    seconds, codec = _stream_seconds(out, "video")
    assert codec == "h264" and seconds == pytest.approx(5.0, abs=1e-6)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    decoded = video.read_video(out)
    expected = list(_ramp_frames(125, 101, 75))
    assert len(decoded) == 125
    for k in (0, 40, 124):
        assert np.abs(decoded[k, :101, :75].astype(int) - expected[k]).mean() < 3
        # edge replication: the padded row/column repeat the last real ones
        assert np.abs(decoded[k, 101].astype(int) - decoded[k, 100]).mean() < 3
    assert list(out.parent.iterdir()) == [out]  # no temporary files left


@pytest.mark.parametrize(
    "audio_name, source_seconds",
    [
        ("MimicTalk__May_5s.mp4", 5.0),  # AAC in MP4, longer than the video: trimmed
        ("LipNet__bbaf2n.mpg", 2.98),  # MP2 in MPEG-PS, shorter: padded with silence
        ("EDTalk__mouth_source.wav", 10.048),  # PCM WAV
    ],
)
def test_write_video_muxes_audio_to_video_length(tmp_path, samples_dir, audio_name, source_seconds):
    audio = samples_dir / audio_name
    assert video.audio_duration(audio) == pytest.approx(source_seconds, abs=0.03)
    out = tmp_path / "out.mp4"
    video.write_video(out, _ramp_frames(100, 64, 64), fps=25, audio=audio)
    assert video.probe(out).duration == pytest.approx(4.0, abs=1e-6)
    seconds, codec = _stream_seconds(out, "audio")
    assert codec == "aac"
    assert abs(seconds - 4.0) < 0.05
    assert abs(video.audio_duration(out) - 4.0) < 0.05
    with av.open(str(out)) as container:
        assert abs(container.duration / 1e6 - 4.0) < 0.05


def test_write_video_audio_has_sound_then_silence(tmp_path, samples_dir):
    out = tmp_path / "out.mp4"
    video.write_video(out, _ramp_frames(150, 32, 32), fps=25, audio=samples_dir / "LipNet__bbaf2n.mpg")
    with av.open(str(out)) as container:
        samples = np.concatenate([f.to_ndarray().mean(0) for f in container.decode(audio=0)])
    rate = video.AUDIO_RATE
    assert np.abs(samples[int(0.5 * rate):int(2.5 * rate)]).max() > 0.01
    assert np.abs(samples[int(3.1 * rate):int(5.9 * rate)]).max() == 0


def test_write_video_rejects_bad_input(tmp_path, samples_dir):
    with pytest.raises(ValueError):
        video.write_video(tmp_path / "a.mp4", [], fps=25)
    with pytest.raises(ValueError, match="same size"):
        video.write_video(tmp_path / "b.mp4", [np.zeros((8, 8, 3), np.uint8),
                                               np.zeros((10, 8, 3), np.uint8)], fps=25)
    with pytest.raises(VideoReadError, match="no audio"):
        video.write_video(tmp_path / "c.mp4", _ramp_frames(5, 8, 8), fps=25,
                          audio=samples_dir / "EDTalk__mouth_source.mp4")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_raise_video_read_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    for call in (video.probe, video.has_audio, lambda p: list(video.read_frames(p)),
                 video.audio_duration):
        with pytest.raises(VideoReadError, match="garbage.mp4"):
            call(garbage)
    with pytest.raises(VideoReadError, match="no such file"):
        video.probe(tmp_path / "missing.mp4")
    message = None
    try:
        video.read_video(tmp_path / "missing.mp4")
    except VideoReadError as exc:
        message = str(exc)
    assert message is not None and "\n" not in message and "check" in message


def test_write_video_output_has_ordinary_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.touch()
    out = video.write_video(tmp_path / "out.mp4", _ramp_frames(3, 16, 16), fps=25)
    assert out.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_media_sha256_ignores_container_tags_but_not_frames(tmp_path):
    from freetalk_core.video import media_sha256, write_video

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    plain = write_video(tmp_path / "plain.mp4", iter(frames), 25.0)
    tagged = write_video(tmp_path / "tagged.mp4", iter(frames), 25.0, metadata={"comment": "synthetic"})
    changed = write_video(tmp_path / "changed.mp4", iter(frames[:4] + [255 - frames[4]]), 25.0)
    assert plain.read_bytes() != tagged.read_bytes()
    assert media_sha256(plain) == media_sha256(tagged)
    assert media_sha256(plain) != media_sha256(changed)


@pytest.mark.parametrize("name", ["SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4",
                                  "LipNet__bbaf2n.mpg"])
def test_read_frames_seeking_gives_the_sequentially_decoded_frames(samples_dir, name):
    path = samples_dir / name
    every = video.read_video(path, fps=25.0)
    n = len(every)
    # backwards jumps, far-ahead jumps and a pingpong run all seek instead of decoding from 0
    wanted = [n - 1, n // 2, 3, n - 2, 1, 0, n - 3, n - 4, n - 5, 60 if n > 60 else n - 6]
    for index, frame in zip(wanted, video.read_frames(path, fps=25.0, indices=wanted)):
        np.testing.assert_array_equal(frame, every[index], err_msg=f"frame {index} of {name}")
