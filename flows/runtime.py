"""How flows run from the command line: Prefect settings scoped to one store."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

DEFAULT_STORE = "./freetalk-store"
API_STARTUP_SECONDS = 600
"""How long a run waits for the local Prefect API it starts. A fresh `PREFECT_HOME` first
creates and migrates its database (about 30 s on a 2-core CPU, minutes on a busy one)."""


def configure_environment(verbose: bool = False) -> None:
    """Environment for Prefect, set before it is imported: no telemetry from this machine,
    run logs sent to the API, and quiet logs on the command line unless asked for."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Run logs reach the Prefect API (and the UI) at INFO; only the console is quiet.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "true")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true" if verbose else "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # worker processes too
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torchvision.*")


def resolve_store(store: str | Path | None) -> Path:
    """`--store`, else `$FREETALK_STORE`, else `./freetalk-store`."""
    return Path(store or os.environ.get("FREETALK_STORE") or DEFAULT_STORE).expanduser().resolve()


@contextmanager
def store_settings(store: Path) -> Iterator[None]:
    """Persist task results and cache keys inside the store, so the cache lives and dies
    with the arrays it points to."""
    from prefect.settings import temporary_settings

    results = Path(store) / ".prefect" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with temporary_settings(updates={"results.local_storage_path": str(results)}):
        yield


@contextmanager
def prefect_api(*, announce: bool = True) -> Iterator[str]:
    """The one Prefect API a run and all its worker processes talk to; yields its URL.

    `$PREFECT_API_URL` when set (checked to answer); otherwise one local `prefect server
    start` on a free loopback port, started for the run and ready before the flow begins
    (its UI shows the run), stopped after it. The URL is put in the environment for the
    duration, so Dask workers and other child processes use this server instead of each
    starting a temporary one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from freetalk_core.errors import FreetalkError

    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not _api_healthy(url, timeout=10.0):
            raise FreetalkError(f"the Prefect API at PREFECT_API_URL={url} does not answer; start it "
                                f"(`prefect server start`) or unset PREFECT_API_URL to use a local one")
        yield url
        return

    if announce:
        print("freetalk: starting a local Prefect server for this run (a new Prefect home first "
              "prepares its database, about 30 s)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    server, url = _start_local_server()
    if announce:
        print(f"freetalk: Prefect server ready in {time.perf_counter() - started:.0f} s; "
              f"UI at {url.removesuffix('/api')}", file=sys.stderr, flush=True)
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _send_pending_logs()
        os.environ.pop("PREFECT_API_URL", None)
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _start_local_server() -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port, once it answers; raises a one-line
    `FreetalkError` when it exits or does not answer within `API_STARTUP_SECONDS`."""
    from prefect.settings import PREFECT_HOME

    from freetalk_core.errors import FreetalkError

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = home / "freetalk-server.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    env = {**os.environ, "PREFECT_UI_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "WARNING"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_stop_with_parent)
    deadline = time.monotonic() + API_STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise FreetalkError(f"the local Prefect server exited with code {server.returncode} "
                                f"before answering ({_failure_reason(log_path, log_start)}); see {log_path}")
        if _api_healthy(url, timeout=2.0):
            return server, url
        time.sleep(0.25)
    server.kill()
    server.wait()
    raise FreetalkError(f"the local Prefect server did not answer within {API_STARTUP_SECONDS} s; "
                        f"see {log_path}, or run `prefect server start` yourself and set "
                        f"PREFECT_API_URL=http://127.0.0.1:4200/api")


def _send_pending_logs() -> None:
    """Deliver the logs and events still queued for the API while the server is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_with_parent() -> None:
    """In the server's process: receive SIGTERM when the process that started it dies, so
    a killed run never leaves its server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _failure_reason(path: Path, start: int) -> str:
    """The last exception line the server logged since `start`, else its last line."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or lines or ["no output"])[-1][:200]


def _api_healthy(url: str, timeout: float) -> bool:
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class StageBars:
    """Rich progress bars, one per stage, fed by `tasks.common.progress`."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=__import__("rich.console").console.Console(stderr=True))
        self.bars: dict[tuple[str, str], int] = {}

    def __call__(self, item_id: str, stage: str, done: int, total: int) -> None:
        key = (item_id, stage)
        if key not in self.bars:
            self.bars[key] = self.progress.add_task(stage, total=total)
        self.progress.update(self.bars[key], completed=done, total=total)

    def __enter__(self):
        from tasks.common import progress

        progress.subscribe(self)
        self.progress.start()
        return self

    def __exit__(self, *exc):
        from tasks.common import progress

        self.progress.stop()
        progress.unsubscribe(self)


def run_pair(identity: Path, lip_ref: Path, out: Path, *, audio: Optional[Path], store: Path,
             models: Path, show_progress: bool = True, **settings) -> tuple[str, Path]:
    """Run the `generate` flow for one pair, copying the result to `out`.

    Returns the item id and the output path."""
    job = pair_job(identity, lip_ref, audio=audio, store=store, models=models, **settings)
    return job.item_id, run_job(job, out, show_progress=show_progress)


def pair_job(identity: Path, lip_ref: Path, *, audio: Optional[Path], store: Path, models: Path,
             **settings):
    """The `ItemJob` of one pair, after checking the inputs (before the heavy imports: a broken
    input is reported at once) and the models; one-line `FreetalkError`s."""
    from flows.inputs import check_input

    for role, path in (("identity", identity), ("lip_ref", lip_ref), ("audio", audio)):
        if path is not None:
            check_input(role, Path(path))
    from flows.generate import make_job
    from freetalk_core.models import describe_models
    from tasks.noise_filter import SILENT_OUTPUT, output_audio

    missing = [f"missing {e.path} ({e.what})" for e in describe_models(models) if not e.present]
    if missing:
        raise_model_problems(models, missing)
    job = make_job(identity, lip_ref, audio=audio, store=store, models=models, check=False, **settings)
    if output_audio(job) is None:
        print(f"warning: {SILENT_OUTPUT}", file=sys.stderr, flush=True)
    return job


def run_job(job, out: Path, *, show_progress: bool = True) -> Path:
    """Run the `generate` flow for `job` and copy its output to `out`. Progress bars are drawn
    when stderr is a terminal (in a pipe or a log they would only add lines)."""
    from flows.generate import generate_to

    store = Path(job.store)
    with prefect_api(), store_settings(store):
        if show_progress and sys.stderr.isatty():
            with StageBars():
                return generate_to(job, out)
        return generate_to(job, out)


def failure_log(store: Path, name: str, exc: BaseException) -> Optional[Path]:
    """Append `exc`'s traceback to the store's log `name` (`storage.Store.log_path`), with the
    command line; None when the store cannot be written."""
    from storage import Store

    try:
        return Store(store).log_failure(name, exc, context=" ".join(sys.argv))
    except (OSError, ValueError):
        return None


def raise_model_problems(models: Path, problems: list[str]) -> None:
    from freetalk_core.errors import ModelFileError

    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    raise ModelFileError(f"models in {models} are not usable: {problems[0]}{more}; "
                         f"run `freetalk models check {models}`, then `freetalk models download` "
                         f"(or `freetalk models tiny` for tests)")
