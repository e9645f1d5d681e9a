"""`freetalk evaluate`: every done item of a store evaluated (`tasks.evaluate`), the aggregate,
Prefect table and markdown artifacts, and, with a report folder, the HTML report.

The aggregate of a metric is its mean over items, except FID and FVD: distances between two
distributions, computed once over every item's frames (clips) pooled, as published tables do.
It is recorded in the metrics table under the item id `_aggregate`, which no real item can take
(item ids start with a letter or digit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from freetalk_core.errors import FreetalkError, one_line
from freetalk_core.evaluation.metrics import aggregate
from storage import Store, arrays
from tasks.evaluate import evaluate_item

AGGREGATE = "_aggregate"
POOLED = {"FID": "inception", "FVD": "i3d"}


def _pooled(store: Store, item_ids: list[str]) -> dict[str, float]:
    """FID and FVD over the features of all `item_ids` pooled (where two or more items have them)."""
    from freetalk_core.evaluation.networks import frechet_distance

    out = {}
    for metric, kind in POOLED.items():
        sides = {"generated": [], "reference": []}
        for item in item_ids:
            specs = {side: arrays.FEATURES[(kind, side)] for side in sides}
            if all(store.has_array(item, spec) for spec in specs.values()):
                for side, spec in specs.items():
                    sides[side].append(store.read(item, spec))
        if len(sides["generated"]) >= 2:
            out[metric] = frechet_distance(np.concatenate(sides["generated"]), np.concatenate(sides["reference"]))
    return out


def _artifacts(results: list[dict], summary: dict[str, float], tiny: bool) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from freetalk_core.evaluation.report import TINY_WARNING, markdown_summary

    rows = [{"item": r["item_id"], "protocol": r["protocol"], **{k: round(v, 6) for k, v in r["metrics"].items()}}
            for r in results]
    rows.append({"item": "(aggregate)", "protocol": "", **{k: round(v, 6) for k, v in summary.items()}})
    create_table_artifact(table=rows, key="freetalk-evaluation-items",
                          description=(f"**{TINY_WARNING}**\n\n" if tiny else "") + "Metrics per item and aggregate")
    create_markdown_artifact(markdown=markdown_summary(summary, len(results), tiny), key="freetalk-evaluation",
                             description="freetalk evaluation: aggregate beside the paper's figures")


@flow(name="evaluate", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def evaluate_store(store_dir: str, out_dir: str | None = None, protocol: str = "auto",
                   models: str | None = None) -> dict:
    """Evaluate every done item of the store, one at a time (a dataset's run passes its Dask
    task runner: then on its workers). Returns `{"results": [...], "aggregate": {...},
    "failures": {item: reason}, "not_done": {item: status}, "report": path or None, "tiny": bool}`
    (tiny: some model is a tiny random-weight stand-in)."""
    from freetalk_core.models import resolve_models_dir
    from freetalk_core.models.check import model_sizes

    logger = get_run_logger()
    store = Store(store_dir)
    states = {r["item_id"]: r["state"] for r in store.status()}
    done = [item for item, state in states.items() if state == "done"]
    not_done = {item: state for item, state in states.items() if state != "done"}
    results, failures = [], {}
    futures = {item: evaluate_item.submit(store_dir, item, protocol, models,
                                          str(Path(out_dir) / "items" / item) if out_dir else None)
               for item in done}
    for item, future in futures.items():
        try:
            results.append(future.result())
        except FreetalkError as exc:
            failures[item] = one_line(exc)
        except Exception as exc:  # noqa: BLE001 - one item's failure never stops the others
            log = store.log_failure(f"evaluate-{item}", exc, "evaluate")
            failures[item] = f"{one_line(exc)} (details in {log})"
        if item in failures:
            logger.warning("%s: not evaluated: %s", item, failures[item])
    summary = aggregate({r["item_id"]: r["metrics"] for r in results})
    summary.update(_pooled(store, [r["item_id"] for r in results]))
    if results:
        store.record_metrics(AGGREGATE, summary)
    models_dir = resolve_models_dir(models or (results[0]["models"] if results else None))
    sizes = model_sizes(models_dir)
    tiny = any(m["full_size"] is False for m in sizes)
    _artifacts(results, summary, tiny)
    report = None
    if out_dir:
        from freetalk_core.evaluation.report import write_report

        report = str(write_report(out_dir, results, summary, sizes, failures))
    return {"results": results, "aggregate": summary, "failures": failures, "not_done": not_done,
            "report": report, "tiny": tiny}
