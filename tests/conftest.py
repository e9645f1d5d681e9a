import os
import tempfile

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The test session's own Prefect home, empty like a new user's: nothing is read from or
# written to the developer's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="freetalk-test-prefect-")

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "samples"
EOS_DIR = SHARED / "models" / "eos"


def decode(path, n: int):
    """The first `n` frames of a video as a generator of (H, W, 3) uint8 RGB."""
    import av

    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= n:
                return
            yield frame.to_ndarray(format="rgb24")


def write_sample_pair(folder: Path, samples: Path, frames: int, names=("identity.mp4", "lip.mp4"),
                      identity_audio: bool = False) -> tuple[Path, Path]:
    """The first `frames` frames (at 25 fps) of two different people's sample clips written to
    `folder` under `names`: an identity clip (silent unless `identity_audio`) and a lip
    reference with its sample's audio."""
    from freetalk_core import video

    out = []
    for name, sample, audio in zip(names, ("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"),
                                   (identity_audio, True)):
        path = folder / name
        video.write_video(path, iter(video.read_video(samples / sample, fps=25.0, max_frames=frames)), 25.0,
                          audio=samples / sample if audio else None)
        out.append(path)
    return out[0], out[1]


def generate_beside_store(job) -> Path:
    """Run the `generate` flow for `job` as the command line does; the output lands beside the
    job's store as `<item_id>.mp4`."""
    from flows.generate import generate_to
    from flows.runtime import configure_environment, store_settings

    configure_environment()
    with store_settings(Path(job.store)):
        return generate_to(job, Path(job.store).parent / f"{job.item_id}.mp4")


def computed_since(store, item: str, since) -> dict[str, int]:
    """Units of work recorded done after `since` (a UTC datetime), per stage."""
    counts: dict[str, int] = {}
    for row in store.stage_rows(item):
        if row["status"] == "done" and row["finished_at"] > since:
            counts[row["stage"]] = counts.get(row["stage"], 0) + 1
    return counts


def outside_mouth_masks(store, item_id: str, identity_frames, frames: int, every: int = 6):
    """`(t, identity frame, outside)` for every `every`-th of the first `frames` output frames:
    the identity frame output frame t is made from, and where in it the paste-back changes
    nothing (bool, frame size)."""
    import numpy as np

    from freetalk_core.paste_back import paste_back
    from storage import arrays
    from tasks.common import mask_weights

    masks = mask_weights(store.read(item_id, arrays.MOUTH_MASKS))
    transforms = store.read(item_id, arrays.CROP_TRANSFORMS["identity"])
    index = store.read(item_id, arrays.SOURCE_INDEX["identity"])
    for t in range(0, min(frames, len(index)), every):
        frame = identity_frames[index[t]]
        full_mask = paste_back(np.zeros_like(frame), np.full(masks.shape[1:] + (3,), 255, np.uint8),
                               transforms[t], masks[t])[..., 0]
        yield t, frame, full_mask == 0


def eos_source(folder: Path) -> Path:
    """The shared eos files, or placeholders where they are absent (for tests that never read
    them: `check_models` only checks that they exist)."""
    if EOS_DIR.is_dir():
        return EOS_DIR
    from freetalk_core.models.layout import EOS_FILES

    placeholder = folder / "eos-placeholder"
    placeholder.mkdir(exist_ok=True)
    for name in EOS_FILES.values():
        (placeholder / name).write_text("placeholder: these tests never read eos files\n")
    return placeholder


def faststart_copy(source: Path, out: Path) -> Path:
    """`source` remuxed with its index (moov) before the media, as streaming exports write it:
    a cut-off copy of such a file still opens, with frames missing."""
    import av

    with av.open(str(source)) as src, av.open(str(out), "w", format="mp4",
                                              options={"movflags": "+faststart"}) as dst:
        kept = [s for s in src.streams if s.type in ("video", "audio")]
        streams = {s.index: dst.add_stream_from_template(s) for s in kept}
        for packet in src.demux(*kept):
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    return out


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared reference folder (sample clips, SFM files); skip where absent."""
    if not SAMPLES.is_dir() or not EOS_DIR.is_dir():
        pytest.skip(f"needs the shared samples and eos files at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def samples_dir(shared_dir) -> Path:
    return shared_dir / "samples"


@pytest.fixture(scope="session")
def eos_dir(shared_dir) -> Path:
    return shared_dir / "models" / "eos"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, eos_dir) -> Path:
    """Tiny random-weight checkpoints in the real on-disk formats, written once per session
    (tests copy them where they need a changed folder)."""
    from freetalk_core.models import write_tiny_models

    path = tmp_path_factory.mktemp("models") / "models"
    write_tiny_models(path, eos_source=eos_dir)
    return path


@pytest.fixture(scope="session")
def tiny_models_anywhere(tmp_path_factory) -> Path:
    """Tiny models written once per session, with the shared eos files or placeholders for them
    (for tests that never read the face model: they run without the shared folder)."""
    from freetalk_core.models import write_tiny_models

    tmp = tmp_path_factory.mktemp("models-anywhere")
    return write_tiny_models(tmp / "tiny", eos_source=eos_source(tmp))


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One local Prefect API for the whole session, started the way every command starts
    it (tests that run the command line in subprocesses inherit its URL)."""
    from flows.runtime import prefect_api

    with prefect_api(announce=False) as url:
        yield url
