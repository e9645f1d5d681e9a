"""How flows run from the command line: Prefect settings scoped to one store."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

DEFAULT_STORE = "./freetalk-store"


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
    from flows.generate import generate_to, make_job
    from freetalk_core.models import describe_models

    missing = [f"missing {e.path} ({e.what})" for e in describe_models(models) if not e.present]
    if missing:
        raise_model_problems(models, missing)
    job = make_job(identity, lip_ref, audio=audio, store=store, models=models, **settings)
    with store_settings(store):
        if show_progress:
            with StageBars():
                return job.item_id, generate_to(job, out)
        return job.item_id, generate_to(job, out)


def raise_model_problems(models: Path, problems: list[str]) -> None:
    from freetalk_core.errors import ModelFileError

    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    raise ModelFileError(f"models in {models} are not usable: {problems[0]}{more}; "
                         f"run `freetalk models check {models}`, then `freetalk models download` "
                         f"(or `freetalk models tiny` for tests)")
