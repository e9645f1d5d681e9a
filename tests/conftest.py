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
def prefect_server_starting(tmp_path_factory):
    """A real Prefect server starting on a free loopback port, with its own PREFECT_HOME
    (database migrations take about 30 s on a small CPU): request this early to overlap its
    start with other set-up. Yields `(process, api_url, home)`."""
    import socket
    import subprocess
    import sys

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
    yield server, api, home
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="session")
def prefect_server(prefect_server_starting):
    """One real Prefect server for the whole test session, ready. Returns its API URL."""
    import time
    import urllib.request

    server, api, home = prefect_server_starting
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
    return api
