"""The README's main command as a new user runs it: an empty HOME, an empty Prefect home, no
Prefect server running. The demo's first flow must work on the first try."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FREETALK = Path(sys.executable).parent / "freetalk"


def _new_user_env(tmp_path: Path, eos_dir: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREETALK_"))}
    env.update(HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect-home"),
               FREETALK_EOS_DIR=str(eos_dir))
    return env


@pytest.mark.slow
def test_demo_first_run_with_empty_home_and_prefect_home(tmp_path, eos_dir):
    env = _new_user_env(tmp_path, eos_dir)
    result = subprocess.run([str(FREETALK), "demo", "-o", str(tmp_path / "demo"), "--seconds", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Prefect server ready" in result.stderr
    assert (tmp_path / "demo" / "output.mp4").stat().st_size > 0
    # The run created its Prefect database in the given home, and left no server running.
    assert (tmp_path / "prefect-home" / "prefect.db").is_file()
    assert not (Path(env["HOME"]) / ".prefect").exists()


def test_cli_with_empty_home(tmp_path, eos_dir):
    env = _new_user_env(tmp_path, eos_dir)
    models = tmp_path / "models"
    for args in (["models", "tiny", str(models)], ["models", "check", str(models)],
                 ["status", str(tmp_path / "store")]):
        result = subprocess.run([str(FREETALK), *args], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_unreachable_prefect_api_is_one_clear_line(tmp_path, eos_dir):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the command runs: nothing listens
    env = _new_user_env(tmp_path, eos_dir)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    result = subprocess.run([str(FREETALK), "demo", "-o", str(tmp_path / "demo"), "--seconds", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: the Prefect API at PREFECT_API_URL=http://127.0.0.1:{port}/api does not "
                     f"answer; start it (`prefect server start`) or unset PREFECT_API_URL to use a "
                     f"local one"]
