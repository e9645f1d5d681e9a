"""Marking the output MP4 of an item: visible label, invisible watermark, metadata, C2PA."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from freetalk_core import provenance
from tasks.common import MODEL_PARTS, ItemJob

PARAMETERS = ["fps", "steps", "guidance", "seed", "ip_adapter_scale", "faceid_variant", "lambda_range", "flow_reference",
              "kernel_size", "noise_window", "filter_along_motion"]


metadata_tags = provenance.metadata_tags


def watermark_id(job: ItemJob) -> str | None:
    """The id the item's output carries in its watermark; None with `mark=False`."""
    return provenance.watermark_id_for(job.item_id) if job.mark else None


def marked_frames(frames: Iterable[np.ndarray], job: ItemJob) -> Iterator[np.ndarray]:
    """The output frames with the job's label and watermark."""
    return provenance.mark_frames(frames, watermark_id(job), job.label)


def sign_output(output: Path, job: ItemJob) -> None:
    """Embed the signed C2PA manifest of the item in `output`."""
    ingredients = [provenance.Ingredient(role, getattr(job, role), getattr(job, f"{role}_sha256"))
                   for role in ("identity", "lip_ref", "audio") if getattr(job, role)]
    parameters = {name: getattr(job, name) for name in PARAMETERS}
    parameters.update(label=job.label, watermarked=job.mark, item_id=job.item_id)
    definition = provenance.signing.manifest_definition(
        output.name, provenance.freetalk_version(), ingredients, parameters,
        provenance.signing.model_hashes(job.models, MODEL_PARTS), watermark_id(job))
    provenance.sign_mp4(output, definition, ingredients)
