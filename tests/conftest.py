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


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One local Prefect API for the whole session, started the way every command starts
    it (tests that run the command line in subprocesses inherit its URL)."""
    from flows.runtime import prefect_api

    with prefect_api(announce=False) as url:
        yield url
