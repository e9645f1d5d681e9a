"""`freetalk demo`: the main job on embedded defaults, runnable on a fresh machine."""

from __future__ import annotations

from pathlib import Path

from flows.preview import write_previews


def run_demo(out_dir: Path, *, identity: Path | None = None, lip_ref: Path | None = None,
             models: Path | None = None, seconds: float = 2.0, show_progress: bool = True) -> list[Path]:
    """Tiny models (unless real ones are configured), the built-in astronaut pair (unless
    clips are given), the flow, then the output MP4 and previews. Returns what was written."""
    import os

    from flows.runtime import run_pair
    from freetalk_core.demo import make_demo_clips
    from freetalk_core.models import check_models, write_tiny_models

    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if models is None and os.environ.get("FREETALK_MODELS"):
        models = Path(os.environ["FREETALK_MODELS"])
    if models is None:
        models = out_dir / "models"
        if check_models(models):
            write_tiny_models(models)
    if identity is None or lip_ref is None:
        built_identity, built_lip_ref = make_demo_clips(out_dir / "inputs", seconds=seconds)
        identity = identity or built_identity
        lip_ref = lip_ref or built_lip_ref
    store = out_dir / "store"
    item_id, output = run_pair(Path(identity), Path(lip_ref), out_dir / "output.mp4", audio=None,
                               store=store, models=Path(models), show_progress=show_progress)
    return [output, *write_previews(store, item_id, out_dir, stem="demo")]
