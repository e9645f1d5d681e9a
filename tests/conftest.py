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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server on a free loopback port for the whole test session, with its
    own PREFECT_HOME (database migrations take about 30 s on a small CPU). Yields its API URL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-home")
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield api
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
