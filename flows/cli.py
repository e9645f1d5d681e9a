"""`freetalk`: the command line, a thin layer over the flows."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from flows.runtime import configure_environment, pair_job, raise_model_problems, resolve_store, run_job

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tuning-free talking-face generation.")
models_app = typer.Typer(no_args_is_help=True, help="Set up and check model checkpoints.")
app.add_typer(models_app, name="models")

VERBOSE = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs.")
STORE = typer.Option(None, help="Store directory [$FREETALK_STORE or ./freetalk-store].")
MODELS = typer.Option(None, help="Models directory [$FREETALK_MODELS].")

# Generation options shared by `generate` and `dataset`.
Steps = Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")]
Guidance = Annotated[float, typer.Option(help="Classifier-free guidance scale.")]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise shared by all frames.")]
BatchSize = Annotated[Optional[int], typer.Option(
    min=1, help="Frames per diffusion batch [4 on CPU; from free memory on GPU].")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Fps = Annotated[Optional[float], typer.Option(
    help="Frame rate of the output (both videos are read at it) [the identity video's].")]
KernelSize = Annotated[int, typer.Option(min=1, help="Noise Sensor: temporal Gaussian taps (odd).")]
FlowReference = Annotated[str, typer.Option(help="Noise Sensor: the motion the output should have: "
                                            "structure (frames) or identity (video).")]
Keep = Annotated[str, typer.Option(
    callback=lambda value: _choice("--keep", value, ("all", "final")),
    help="What the store keeps of a done item: all (every stage's arrays) or final (output, stage rows, metrics).")]
FilterAlongMotion = Annotated[bool, typer.Option(help="Noise Sensor: smooth each pixel along its motion "
                                                 "(default) or in place.")]
NoiseWindow = Annotated[int, typer.Option(min=2, help="Noise Sensor: flow fields in the sliding statistics window.")]
FaceIdVariant = Annotated[str, typer.Option(help="IP-Adapter-FaceID file: plus (default) or plusv2.")]
IpScale = Annotated[float, typer.Option(min=0.0, help="IP-Adapter scale.")]
LambdaRange = Annotated[tuple[float, float], typer.Option(help="Controller: the range lambda_t is clipped to (MIN MAX).")]
FaceIndex = Annotated[int, typer.Option(min=0, help="Which face of the identity speaks where several are "
                                        "in frame, by size: 0 the largest, 1 the next.")]
FaceBox = Annotated[Optional[str], typer.Option(help="Or the identity's face whose box overlaps this one "
                                                "most: x0,y0,x1,y1 in frame pixels.")]
Detector = Annotated[str, typer.Option(
    callback=lambda value: _choice("--detector", value, ("dlib", "insightface")),
    help="Face detector: dlib (offline default) or insightface (MODELS/insightface/det_10g.onnx of buffalo_l).")]
Mark = Annotated[bool, typer.Option("--mark/--no-mark", help="Invisible watermark in every output (default). "
                                    "--no-mark is for research evaluation runs only; it is recorded in the store.")]
Label = Annotated[Optional[str], typer.Option(help="Visible label drawn on every output frame, e.g. 'AI-generated'.")]


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


GENERATION_OPTIONS = (
    _option("keep", Keep, "all"), _option("steps", Steps, 20), _option("guidance", Guidance, 7.5),
    _option("seed", Seed, 42), _option("batch_size", BatchSize, None), _option("device", Device, "auto"),
    _option("kernel_size", KernelSize, 5), _option("flow_reference", FlowReference, "structure"),
    _option("filter_along_motion", FilterAlongMotion, True), _option("fps", Fps, None),
    _option("noise_window", NoiseWindow, 100), _option("faceid_variant", FaceIdVariant, "plus"),
    _option("ip_scale", IpScale, 1.0), _option("lambda_range", LambdaRange, (0.5, 2.0)),
    _option("face_index", FaceIndex, 0), _option("face_box", FaceBox, None), _option("detector", Detector, "dlib"),
    _option("mark", Mark, True), _option("label", Label, None),
)
"""The options `generate` and `dataset` share (`with_generation_options`)."""


def with_generation_options(command: Callable) -> Callable:
    """`command` with `GENERATION_OPTIONS` after its own parameters on the command line; it
    gets them as one `settings` dict (`generation_settings`) in place of its `settings` parameter."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    names = [p.name for p in GENERATION_OPTIONS]

    @functools.wraps(command)
    def with_settings(**values):
        settings = generation_settings(**{name: values.pop(name) for name in names})
        return command(**values, settings=settings)

    parameters = own + list(GENERATION_OPTIONS)
    with_settings.__signature__ = inspect.Signature(parameters)
    with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_settings


def generation_settings(steps: int, guidance: float, seed: int, batch_size: Optional[int], device: str,
                        kernel_size: int, flow_reference: str, filter_along_motion: bool, noise_window: int,
                        faceid_variant: str, ip_scale: float, lambda_range: tuple[float, float],
                        face_index: int = 0, face_box: Optional[str] = None, detector: str = "dlib",
                        fps: Optional[float] = None, keep: str = "all", mark: bool = True,
                        label: Optional[str] = None) -> dict:
    """The generation options as flow settings; a bad value exits with status 2 and one line.

    Of the marking options only what differs from the defaults is set, so item ids stay those
    of a default run; --no-mark is warned about."""
    if fps is not None and not fps > 0:
        fail(f"--fps must be a positive frame rate, got {fps}", 2)
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {device!r}", 2)
    if kernel_size % 2 == 0:
        fail(f"--kernel-size must be odd, got {kernel_size}", 2)
    if flow_reference not in ("structure", "identity"):
        fail(f"--flow-reference must be structure or identity, got {flow_reference!r}", 2)
    if faceid_variant not in ("plus", "plusv2"):
        fail(f"--faceid-variant must be plus or plusv2, got {faceid_variant!r}", 2)
    if not 0 < lambda_range[0] <= 1 <= lambda_range[1]:
        fail(f"--lambda-range needs 0 < MIN <= 1 <= MAX, got {lambda_range[0]} {lambda_range[1]}", 2)
    return dict(steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, device=device,
                kernel_size=kernel_size, flow_reference=flow_reference,
                filter_along_motion=filter_along_motion, noise_window=noise_window,
                faceid_variant=faceid_variant, ip_adapter_scale=ip_scale, lambda_range=tuple(lambda_range),
                face_index=face_index, face_box=parse_face_box(face_box), detector=detector,
                fps=fps, keep=keep, **marking_settings(mark, label))


def marking_settings(mark: bool, label: Optional[str]) -> dict:
    """Job settings for the marking options that differ from the defaults; warns about --no-mark."""
    if not mark:
        typer.echo("warning: --no-mark: outputs carry no invisible watermark (the C2PA manifest "
                   "is still embedded; the store records the run as unmarked)", err=True)
    return {**({} if mark else {"mark": False}), **({"label": label} if label else {})}


def parse_face_box(text: Optional[str]) -> Optional[tuple[float, float, float, float]]:
    """`--face-box x0,y0,x1,y1` as four floats (x1 > x0, y1 > y0); else exit 2 with one line."""
    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        fail(f"--face-box must be x0,y0,x1,y1 in frame pixels with x1 > x0 and y1 > y0, got {text!r}", 2)
    return box


def _choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(f"{option} must be {' or '.join(choices)}, got {value!r}", 2)
    return value


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fail_logged(exc: BaseException, store: Path, log_name: str) -> None:
    """Exit 1 with one line on stderr: the reason and the log file that holds the traceback
    (`STORE/logs/<item_id>.log`, or `STORE/logs/<command>.log` before an item is known)."""
    from flows.runtime import failure_log
    from freetalk_core.errors import FreetalkError, one_line

    log = failure_log(store, log_name, exc)
    details = f"details in {log}" if log else "no log written: the store cannot be written"
    if isinstance(exc, FreetalkError):
        fail(f"{one_line(exc)} ({details})")
    fail(f"{one_line(exc)} (unexpected: {details}; rerun with --verbose, and report it with that "
         f"file if it persists)")


def or_fail(action: Callable[[], Any]) -> Any:
    """`action()`; a FreetalkError (a problem the user can fix) exits 1 with its message."""
    from freetalk_core.errors import FreetalkError

    try:
        return action()
    except FreetalkError as exc:
        fail(str(exc))


def _models_dir(models: Optional[Path]) -> Path:
    from freetalk_core.models import resolve_models_dir

    return resolve_models_dir(models)


@app.command()
@with_generation_options
def generate(
    identity: Path = typer.Argument(..., help="Video of the person who should speak."),
    lip_ref: Path = typer.Argument(..., help="Video of anyone speaking the wanted words."),
    out: Path = typer.Option(..., "-o", "--out", help="Output MP4."),
    audio: Optional[Path] = typer.Option(None, help="Audio to use instead of the lip reference's."),
    store: Optional[Path] = STORE,
    models: Optional[Path] = MODELS,
    preview: bool = typer.Option(False, help="Also write side-by-side previews next to OUT."),
    verbose: bool = VERBOSE,
    settings: dict = None,
) -> None:
    """Make IDENTITY speak with the lip motion of LIP_REF. On failure: exit 1 and one line on
    stderr naming the log file with the details."""
    configure_environment(verbose)
    if preview and settings["keep"] == "final":
        fail("--preview needs the stage arrays: use it with --keep all", 2)
    store_dir = resolve_store(store)
    job = None
    try:
        models_dir = _models_dir(models)
        job = pair_job(identity, lip_ref, audio=audio, store=store_dir, models=models_dir, **settings)
        result = run_job(job, out, show_progress=not verbose)
        if preview:
            from flows.preview import write_previews

            for path in write_previews(store_dir, job.item_id, result.parent, stem=result.stem):
                typer.echo(f"preview: {path}")
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to go on where it stopped", 130)
    except Exception as exc:  # noqa: BLE001 - every failure: one line here, the traceback in a log
        fail_logged(exc, store_dir, job.item_id if job else "generate")
    typer.echo(str(result))


@app.command()
@with_generation_options
def dataset(
    manifest: Path = typer.Argument(..., help="CSV or Parquet: item_id, identity, lip_ref[, audio]."),
    store: Optional[Path] = STORE,
    models: Optional[Path] = MODELS,
    workers: Optional[int] = typer.Option(None, min=1, help="Local Dask worker processes [one per core; "
                                          "one per GPU on CUDA hosts with dask-cuda]."),
    dask_address: Optional[str] = typer.Option(None, help="Scheduler of an existing Dask cluster "
                                               "(tcp://HOST:8786) instead of a local one."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try items that failed before again "
                                      "(else they are skipped and reported)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Then evaluate every done item "
                                  "(`freetalk evaluate`), the report in STORE/evaluation."),
    verbose: bool = VERBOSE,
    settings: dict = None,
) -> None:
    """Generate every pair of MANIFEST not already done, across Dask workers; failures are
    recorded with a one-line reason, the rest goes on; exit 1 if anything failed."""
    configure_environment(verbose)
    if workers and dask_address:
        fail("give --workers or --dask-address, not both", 2)
    from flows.dataset import dataset_task_runner, process_dataset
    from flows.runtime import prefect_api, store_settings
    from freetalk_core.models import describe_models

    store_dir = resolve_store(store)
    try:
        models_dir = _models_dir(models)
        missing = [f"missing {e.path}" for e in describe_models(models_dir) if not e.present]
        if missing:
            raise_model_problems(models_dir, missing)
        run = process_dataset.with_options(task_runner=dataset_task_runner(workers, dask_address))
        with prefect_api(), store_settings(store_dir):
            results = run(str(manifest), str(store_dir), str(models_dir), retry_failed=retry_failed, **settings)
            evaluation = (run_evaluation(store_dir, store_dir / "evaluation",
                                         task_runner=dataset_task_runner(workers, dask_address))
                          if evaluate else None)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to go on where it stopped", 130)
    except Exception as exc:  # noqa: BLE001 - the run itself failed: one line, the traceback in a log
        fail_logged(exc, store_dir, "dataset")
    by_status: dict[str, list[str]] = {}
    for item_id, result in sorted(results.items()):
        by_status.setdefault(result["status"], []).append(item_id)
    failed, skipped = by_status.get("failed", []), by_status.get("skipped", [])
    for item_id in failed:
        typer.echo(f"failed: {item_id}: {results[item_id]['error']}{_log_note(store_dir, item_id)}", err=True)
    for item_id in skipped:
        typer.echo(f"skipped: {item_id}: {results[item_id]['error']}", err=True)
    typer.echo(f"{len(by_status.get('done', []))} done, {len(failed)} failed"
               + (f", {len(skipped)} held by another run" if skipped else "") + f" ({store_dir})")
    if failed or (evaluation is not None and evaluation["failures"]):
        raise typer.Exit(1)


def _log_note(store: Path, item_id: str) -> str:
    """` (details in LOG)` where the item's failure log exists."""
    from storage import Store

    try:
        log = Store(store).log_path(item_id)
    except ValueError:  # an item id the store rejects has no log
        return ""
    return f" (details in {log})" if log.is_file() else ""


@app.command()
def status(
    store: Optional[Path] = typer.Argument(None, help="Store [$FREETALK_STORE or ./freetalk-store]."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of per-item records."),
) -> None:
    """What is done, running, interrupted, pending and failed in STORE, from what is on disk.
    Exit status 1 when an item failed."""
    import json

    from storage import Store

    s = Store(resolve_store(store))
    records = s.status()
    counts: dict[str, int] = {}
    for record in records:
        counts[record["state"]] = counts.get(record["state"], 0) + 1
    if as_json:
        typer.echo(json.dumps(records))
    elif not records:
        typer.echo(f"{s.root}: no items")
    else:
        header = ("item", "state", "stages", "seconds", "error / output")
        lines = [(r["item_id"], r["state"], f"{r['stages_done']}/{r['stages_total']}", f"{r['seconds']:.1f}",
                  r["error"] or r["output"] or "") for r in records]
        widths = [max(len(header[i]), max(len(line[i]) for line in lines)) for i in range(4)]
        out = [str(s.root)]
        for line in [header, *lines]:
            out.append("  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1]),
                                  line[2].rjust(widths[2]), line[3].rjust(widths[3]), line[4]]).rstrip())
        typer.echo("\n".join(out))
        typer.echo(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if counts.get("failed"):
        raise typer.Exit(1)


@models_app.command("tiny")
def models_tiny(directory: Path = typer.Argument(..., help="Where to write the tiny models.")) -> None:
    """Write tiny random-weight checkpoints in the real on-disk formats (for tests and demos)."""
    configure_environment()
    from freetalk_core.models import write_tiny_models

    or_fail(lambda: write_tiny_models(directory))
    typer.echo(f"tiny models written to {directory} (random weights: outputs are noise by design)")


@models_app.command("download")
def models_download(directory: Path = typer.Argument(..., help="Where to put the real checkpoints.")) -> None:
    """Download the real checkpoints (needs internet), verified by checksum."""
    configure_environment()
    from freetalk_core.models import download_models

    or_fail(lambda: download_models(directory))


@models_app.command("check")
def models_check(directory: Optional[Path] = typer.Argument(None, help="Models directory [$FREETALK_MODELS].")) -> None:
    """Say what is present, what is missing and what is wrong; exit 1 on any problem."""
    configure_environment()
    from freetalk_core.models import check_models, format_description

    directory = or_fail(lambda: _models_dir(directory))
    typer.echo(format_description(directory))
    problems = check_models(directory)
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{directory}: all components present and usable")


@app.command()
def evaluate(
    store: Optional[Path] = typer.Argument(None, help="Store [$FREETALK_STORE or ./freetalk-store]."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Report folder: index.html and its PNGs."),
    protocol: str = typer.Option("auto", callback=lambda value: _choice("--protocol", value, ("auto", "self", "cross")),
                                 help="self (identity = lip reference = ground truth), cross (lip metrics "
                                      "against the lip reference, CSIM against the identity), or auto: self "
                                      "where an item's two inputs are one file."),
    models: Optional[Path] = typer.Option(None, help="Models directory [the one each item ran with, else "
                                          "$FREETALK_MODELS]."),
    workers: Optional[int] = typer.Option(None, min=1, help="Evaluate on this many local Dask worker "
                                          "processes [one item at a time in this process]."),
    dask_address: Optional[str] = typer.Option(None, help="Or on the workers of an existing Dask cluster."),
    verbose: bool = VERBOSE,
) -> None:
    """Metrics of every done item of STORE (PD, CSLD, PCLD, CPBD, MNP before and after the
    filter, FID, LPIPS, FVD, LSE-C, LSE-D, CSIM) into its metrics table, and the report with -o.
    Exit 1 when an item could not be evaluated or none is done."""
    configure_environment(verbose)
    from flows.runtime import prefect_api, store_settings

    if workers and dask_address:
        fail("give --workers or --dask-address, not both", 2)
    store_dir = resolve_store(store)
    try:
        runner = None
        if workers or dask_address:
            from flows.dataset import dataset_task_runner

            runner = dataset_task_runner(workers, dask_address)
        with prefect_api(), store_settings(store_dir):
            summary = run_evaluation(store_dir, out, protocol, models, task_runner=runner)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again", 130)
    except Exception as exc:  # noqa: BLE001 - one line here, the traceback in a log
        fail_logged(exc, store_dir, "evaluate")
    if summary["failures"] or not summary["results"]:
        raise typer.Exit(1)


def run_evaluation(store_dir: Path, out: Optional[Path], protocol: str = "auto",
                   models: Optional[Path] = None, task_runner=None) -> dict:
    """The evaluate flow on a store (on `task_runner`'s workers where given), its outcome
    printed: the aggregate, one line per item not evaluated (stderr), the report's path."""
    from flows.evaluate import evaluate_store
    from freetalk_core.evaluation.report import TINY_WARNING, aggregate_rows

    run = evaluate_store.with_options(task_runner=task_runner) if task_runner else evaluate_store
    summary = run(str(store_dir), str(Path(out).resolve()) if out else None, protocol,
                  str(Path(models).resolve()) if models else None)
    for item, reason in sorted(summary["failures"].items()):
        typer.echo(f"not evaluated: {item}: {reason}", err=True)
    if summary["not_done"]:
        typer.echo(f"{len(summary['not_done'])} item(s) not done, not evaluated", err=True)
    if summary["tiny"]:
        typer.echo(f"warning: {TINY_WARNING}", err=True)
    typer.echo(f"{'metric':32s} {'this run':>10s} {'paper HDTF':>11s} {'CREMA':>8s}")
    for row in aggregate_rows(summary["aggregate"]):
        name, value, hdtf, crema = (c.replace("&ndash;", "-").replace(" &uarr;", " (higher better)")
                                    .replace(" &darr;", " (lower better)") for c in row)
        typer.echo(f"{name:32s} {value:>10s} {hdtf:>11s} {crema:>8s}")
    typer.echo(f"{len(summary['results'])} evaluated, {len(summary['failures'])} not evaluated ({store_dir})")
    if summary["report"]:
        typer.echo(f"report: {summary['report']}")
    return summary


@app.command()
def verify(files: list[Path] = typer.Argument(..., help="Videos to check.")) -> None:
    """Is each video marked as made by freetalk? Reads the C2PA manifest and the watermark.

    Exit status: 0 when every file is marked, 1 when one is not, 2 when one is unreadable."""
    from freetalk_core import provenance

    worst = 0
    for path in files:
        result = provenance.verify(path)
        typer.echo(provenance.format_verification(result))
        worst = max(worst, result.exit_code)
    raise typer.Exit(worst)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("freetalk-demo"), "-o", "--out-dir", help="Where results go."),
    identity: Optional[Path] = typer.Option(None, help="Identity clip instead of the built-in one."),
    lip_ref: Optional[Path] = typer.Option(None, help="Lip-reference clip instead of the built-in one."),
    models: Optional[Path] = typer.Option(None, help="Models directory [$FREETALK_MODELS, else tiny ones in OUT_DIR]."),
    seconds: float = typer.Option(2.0, help="Length of the built-in clips."),
    verbose: bool = VERBOSE,
) -> None:
    """The main job on embedded defaults: tiny models, a built-in pair, output and previews."""
    configure_environment(verbose)
    from flows.demo import run_demo

    written = or_fail(lambda: run_demo(out_dir, identity=identity, lip_ref=lip_ref, models=models,
                                       seconds=seconds, show_progress=not verbose))
    for path in written:
        typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
