import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "samples"
EOS_DIR = SHARED / "models" / "eos"


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
