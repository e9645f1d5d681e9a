"""How flows run from the command line: Prefect settings scoped to one store."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_STORE = "./freetalk-store"


def configure_environment(verbose: bool = False) -> None:
    """Environment for Prefect, set before it is imported: no telemetry from this machine,
    and quiet logs on the command line unless asked for."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true" if verbose else "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
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
