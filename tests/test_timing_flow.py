"""Frame rates, lengths and audio through the whole `generate` flow (tiny models, clips of
1.2 s or less): a 30 fps identity with a 25 fps lip reference stays in sync, a short identity
loops without a jump, a longer one is trimmed, a longer `--audio` sets the length, and an
item without any audio gives a silent output and a warning."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from test_timing import audio_stream, click_times, click_wav, decoded_video

from freetalk_core import video
from storage import Store, arrays

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(steps=2, batch_size=4)


def clip(samples_dir, name, out, fps, seconds, flashes=(), audio=None):
    """`seconds` of sample `name` at `fps`, the frames in `flashes` brightened by 70 grey levels."""
    frames = video.read_video(samples_dir / name, fps=fps, max_frames=int(round(seconds * fps)))
    for k in flashes:
        frames[k] = np.clip(frames[k].astype(np.int16) + 70, 0, 255).astype(np.uint8)
    return video.write_video(out, iter(frames), fps, audio=audio)


def run(job):
    from flows.generate import generate_to
    from flows.runtime import configure_environment, store_settings

    configure_environment()
    with store_settings(Path(job.store)):
        return generate_to(job, Path(job.store).parent / f"{job.item_id}.mp4")


def flashes(values: np.ndarray) -> np.ndarray:
    """Indices where `values` (one mean brightness per frame) jumps up by more than 30."""
    values = np.asarray(values, dtype=np.float64)
    return np.flatnonzero(np.diff(values) > 30) + 1


# ------------------------------------------------------------------ 30 fps identity, 25 fps lips
@pytest.fixture(scope="module")
def sync_run(tmp_path_factory, samples_dir, tiny_models):
    from flows.generate import make_job

    folder = tmp_path_factory.mktemp("sync")
    clicks = (0.2, 1.0)  # identity frames 6 and 30 at 30 fps, lip frames 5 and 25 at 25 fps
    wav = click_wav(folder / "clicks.wav", 16000, 1, 1.2, clicks)
    identity = clip(samples_dir, "VideoRetalking__face_4.mp4", folder / "identity30.mp4", 30, 1.2, (6, 30))
    lip = clip(samples_dir, "MimicTalk__May_5s.mp4", folder / "lip25.mp4", 25, 1.2, (5, 25), audio=wav)
    job = make_job(identity, lip, store=folder / "store", models=tiny_models, **SETTINGS)
    return job, run(job), clicks


def test_30fps_identity_keeps_its_rate_and_stays_in_sync_with_a_25fps_lip_reference(sync_run):
    from tasks.frames import Crops

    job, out, clicks = sync_run
    frame = 1 / 30
    assert job.fps == pytest.approx(30.0)
    info = video.probe(out)
    assert info.fps == pytest.approx(30.0) and info.n_frames == 36
    frames, _ = decoded_video(out)
    # The identity's flashes are where they were in the identity: its timing is kept.
    seen = flashes([f.mean() for f in frames]) / 30
    np.testing.assert_allclose(seen, clicks, atol=1e-6)
    # The lip reference's clicks are heard at the same times, the last one in the last second.
    heard = click_times(out)
    assert len(heard) == 2 and np.abs(heard - np.asarray(clicks)).max() <= frame
    # The lip motion of output frame t comes from the lip reference at time t / 30: its flashed
    # frames drive the output frames shown with the clicks.
    store = Store(job.store)
    lip_crops = Crops(store, job.item_id, "lip_ref")[:]
    driven = flashes(lip_crops.reshape(len(lip_crops), -1).mean(axis=1)) / 30
    assert np.abs(driven - np.asarray(clicks)).max() <= frame
    _, _, seconds = audio_stream(out)
    assert abs(seconds - len(frames) / 30) <= frame
    assert store.item(job.item_id)["fps"] == pytest.approx(30.0)


# ------------------------------------------- short identity, silent lip reference, longer --audio
@pytest.fixture(scope="module")
def long_audio_run(tmp_path_factory, samples_dir, tiny_models):
    from flows.generate import make_job

    folder = tmp_path_factory.mktemp("long_audio")
    identity = clip(samples_dir, "SadTalker__WDA_KatieHill_000.mp4", folder / "identity.mp4", 25, 0.4)
    lip = clip(samples_dir, "MimicTalk__May_5s.mp4", folder / "lip_silent.mp4", 25, 0.8)
    assert not video.has_audio(lip)
    clicks = (0.3, 1.0)
    wav = click_wav(folder / "speech.wav", 44100, 2, 1.2, clicks)
    job = make_job(identity, lip, audio=wav, store=folder / "store", models=tiny_models, **SETTINGS)
    return job, run(job), clicks


def test_longer_audio_sets_the_length_and_both_videos_loop(long_audio_run):
    job, out, clicks = long_audio_run
    store = Store(job.store)
    info = video.probe(out)
    assert info.fps == pytest.approx(25.0) and info.n_frames == 30  # 1.2 s of audio at 25 fps
    rate, channels, seconds = audio_stream(out)
    assert (rate, channels) == (video.AUDIO_RATE, 2) and seconds == pytest.approx(1.2, abs=1 / 25)
    # The lip reference has no audio: the given file's is muxed, on time.
    assert np.abs(click_times(out) - np.asarray(clicks)).max() <= 1 / 25
    np.testing.assert_array_equal(store.read(job.item_id, arrays.SOURCE_INDEX["identity"]),
                                  video.pingpong_indices(10, 30))
    np.testing.assert_array_equal(store.read(job.item_id, arrays.SOURCE_INDEX["lip_ref"]),
                                  video.pingpong_indices(20, 30))


def test_a_looped_identity_shows_no_jump_at_the_turns(long_audio_run):
    job, out, _ = long_audio_run
    frames, _ = decoded_video(out)
    top = np.stack(frames)[:, : frames[0].shape[0] * 2 // 5].astype(np.float64)  # above the mouth
    steps = np.abs(np.diff(top, axis=0)).mean(axis=(1, 2, 3))
    index = Store(job.store).read(job.item_id, arrays.SOURCE_INDEX["identity"])
    turn = np.diff(np.sign(np.diff(index))) != 0  # steps t -> t+1 where the direction changes
    turns, ordinary = steps[1:][turn], np.concatenate([steps[:1], steps[1:][~turn]])
    assert len(turns) == 3
    assert turns.max() <= ordinary.max()
    # A loop that restarted (frame 9 -> frame 0) would jump far more than any ordinary step.
    identity = np.stack(list(video.read_frames(job.identity, fps=25)))[:, : top.shape[1]].astype(np.float64)
    assert np.abs(identity[-1] - identity[0]).mean() > 1.5 * ordinary.max()


# ------------------------------------------------- longer identity, no audio anywhere, --fps 30
@pytest.fixture(scope="module")
def silent_run(tmp_path_factory, samples_dir, tiny_models, prefect_server):
    from flows.generate import make_job

    folder = tmp_path_factory.mktemp("silent")
    identity = clip(samples_dir, "SadTalker__WDA_KatieHill_000.mp4", folder / "identity.mp4", 25, 1.0)
    lip = clip(samples_dir, "MimicTalk__May_5s.mp4", folder / "lip_silent.mp4", 25, 0.4)
    job = make_job(identity, lip, store=folder / "store", models=tiny_models, fps=30.0, **SETTINGS)
    return job, run(job)


def _run_logs(prefect_server, flow_run_name):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    APILogWorker.drain_all(timeout=10)

    async def read():
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            async with get_client() as client:
                runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=[flow_run_name])))
                logs = []
                for flow_run in runs:
                    logs += await client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [flow_run.id]}))
                return logs

    return asyncio.run(read())


def test_no_audio_anywhere_gives_a_silent_trimmed_output_and_a_warning(silent_run, prefect_server, tmp_path):
    from tasks.noise_filter import SILENT_OUTPUT

    job, out = silent_run
    info = video.probe(out)
    assert not info.has_audio
    # --fps 30: the 0.4 s lip reference gives 12 frames; the 1 s identity is cut to its first 12.
    assert info.fps == pytest.approx(30.0) and info.n_frames == 12
    store = Store(job.store)
    np.testing.assert_array_equal(store.read(job.item_id, arrays.SOURCE_INDEX["identity"]), np.arange(12))
    # The warning is in the run log ...
    logs = _run_logs(prefect_server, f"generate[{job.item_id}]")
    assert any(SILENT_OUTPUT in log.message and log.level >= 30 for log in logs), [l.message for l in logs]
    # ... and on the command line's stderr; the same settings find the item done.
    rows = len(store.stage_rows(job.item_id))
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", job.identity, job.lip_ref, "-o", str(tmp_path / "o.mp4"),
         "--store", job.store, "--models", job.models, "--steps", "2", "--fps", "30"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: {SILENT_OUTPUT}" in result.stderr.splitlines()
    assert len(store.stage_rows(job.item_id)) == rows  # nothing ran again
    assert video.probe(tmp_path / "o.mp4").fps == pytest.approx(30.0)
    with av.open(str(tmp_path / "o.mp4")) as container:
        assert not container.streams.audio


@pytest.mark.parametrize("command", ["generate", "dataset"])
def test_cli_rejects_a_bad_fps_in_one_line(tmp_path, command):
    inputs = ["a.mp4", "b.mp4", "-o", str(tmp_path / "o.mp4")] if command == "generate" else ["m.csv"]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", command, *inputs, "--store", str(tmp_path / "s"), "--fps", "0"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--fps must be a positive frame rate, got 0.0" in lines[0]
