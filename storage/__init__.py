"""The store: Zarr arrays per item and stage, Parquet metadata tables, atomic commits.

This package is the only code that knows paths inside a store; `storage.arrays` names every
stage and every stage's arrays.
"""

from storage import arrays
from storage.arrays import EVALUATION, STAGES
from storage.store import ITEM_STATUSES, Store, sha256_file

__all__ = ["EVALUATION", "ITEM_STATUSES", "STAGES", "Store", "arrays", "sha256_file"]
