"""The store: Zarr arrays per item and stage, Parquet metadata tables, atomic commits.

This package is the only code that knows paths inside a store.
"""

from storage.store import EVALUATION, ITEM_STATUSES, STAGES, Store, sha256_file

__all__ = ["EVALUATION", "ITEM_STATUSES", "STAGES", "Store", "sha256_file"]
