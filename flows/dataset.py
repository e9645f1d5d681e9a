"""The `dataset` flow: every pair of a manifest, resumable, one failure never stops the rest."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from flows.generate import generate, make_job
from freetalk_core.errors import FreetalkError
from storage import Store
from tasks.common import one_line

REQUIRED_COLUMNS = ("item_id", "identity", "lip_ref")


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV or Parquet manifest with `item_id, identity, lip_ref[, audio]`; relative
    paths are taken from the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FreetalkError(f"manifest not found: {path}")
    table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FreetalkError(f"manifest {path} lacks column(s) {', '.join(missing)}; "
                            f"it needs {', '.join(REQUIRED_COLUMNS)} and optionally audio")
    rows = []
    for row in table.to_pylist():
        for key in ("identity", "lip_ref", "audio"):
            if row.get(key):
                p = Path(str(row[key])).expanduser()
                row[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        rows.append(row)
    ids = [str(r["item_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise FreetalkError(f"manifest {path} repeats item_id values; each must be unique")
    return rows


@flow(name="dataset", log_prints=True)
def process_dataset(manifest: str, store: str, models: str, **settings) -> dict[str, str]:
    """Generate every manifest pair not already done. Returns `{item_id: status}`."""
    logger = get_run_logger()
    results: dict[str, str] = {}
    db = Store(store)
    for row in read_manifest(manifest):
        item_id = str(row["item_id"])
        current = db.item(item_id)
        if current and current["status"] == "done" and current["output"] and Path(current["output"]).exists():
            results[item_id] = "done"
            continue
        try:
            job = make_job(row["identity"], row["lip_ref"], audio=row.get("audio") or None,
                           store=store, models=models, item_id=item_id, **settings)
            generate(job)
            results[item_id] = "done"
        except Exception as exc:  # noqa: BLE001 - every item's failure is recorded, the run goes on
            reason = one_line(exc)
            db.record_item(item_id, "failed", identity=row["identity"], lip_ref=row["lip_ref"],
                           error=reason)
            logger.error("%s failed: %s", item_id, reason)
            results[item_id] = "failed"
    return results
