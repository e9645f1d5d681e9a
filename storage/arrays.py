"""The catalogue of the store: every stage, every stage's arrays and attributes.

Each array is declared once here with its name on disk (`<stage>/<name>` inside an item's
Zarr group), its shape, dtype and chunking; stages create, write and read arrays only through
these declarations (`Store.create_array(item_id, spec, shape)`, `Store.read(item_id, spec)`).

Shapes are written in these sizes:

    T     output frames (the lip reference's length, or the given audio's)
    F     flow fields: T - 1
    S     distinct source frames of both videos fitted (identity's first, then the lip reference's)
    crop  the crop side (`freetalk_core.CROP_SIZE`, 512)
    h, w  the mouth box (`face_crop` attribute `box`: x0, y0, x1, y1; h = y1 - y0, w = x1 - x0)
    N, D  CLIP image tokens and their width (257 x 1280 for ViT-H/14)
    K, E  3DMM shape and expression coefficients (63 and 6 for the SFM 3448)

The evaluation's measurements have a group of their own (`EVALUATION`), declared the same way.

Chunking: `FRAMES` arrays are chunked along the frame axis by the job's `chunk_frames` (the
unit of caching and resume), one chunk holding whole frames; `TILED` ones are as `FRAMES`, each
chunk of frames one shard of `MASK_TILE x MASK_TILE` pieces, all-zero pieces not stored (frames
that hold data in the mouth box only); `AUTO` ones (small, whole-clip arrays) take Zarr's own
chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACE_CROP = "face_crop"
FIT_3DMM = "fit_3dmm"
STRUCTURE_RENDER = "structure_render"
CLIP_EMBED = "clip_embed"
CONTROLLER = "controller"
DIFFUSION = "diffusion"
OPTICAL_FLOW = "optical_flow"
NOISE_FILTER = "noise_filter"
STAGES = (FACE_CROP, FIT_3DMM, STRUCTURE_RENDER, CLIP_EMBED, CONTROLLER, DIFFUSION, OPTICAL_FLOW,
          NOISE_FILTER)
"""The eight stages, in the order they run; each is one Zarr group per item."""
EVALUATION = "evaluation"
"""The item group `freetalk evaluate` keeps its measurements in (not a stage: no stage rows)."""
GROUPS = (*STAGES, EVALUATION)

ROLES = ("identity", "lip_ref")
"""The two input videos of an item."""

FRAMES, TILED, AUTO = "frames", "tiled", "auto"
MASK_TILE = 64
"""Side of the stored pieces of `TILED` arrays."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of one stage: `stage/name` on disk, `shape` in the sizes of the module
    docstring (a number is a fixed size), `dtype`, `chunking` (FRAMES, TILED or AUTO)."""

    stage: str
    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype
    chunking: str
    doc: str

    @property
    def path(self) -> str:
        return f"{self.stage}/{self.name}"

    def check_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`shape` as ints, if it fits the declaration (rank, fixed sizes, a named size the
        same wherever it stands); else ValueError naming the array."""
        shape = tuple(int(s) for s in shape)
        sizes: dict[str, int] = {}
        fits = len(shape) == len(self.shape)
        for declared, size in zip(self.shape, shape):
            if isinstance(declared, int):
                fits = fits and declared == size
            else:
                fits = fits and sizes.setdefault(declared, size) == size
        if not fits:
            raise ValueError(f"{self.path}: shape {shape} does not fit the declared {self.shape}")
        return shape

    def chunks(self, shape: tuple[int, ...], chunk_frames: int | None) -> tuple[tuple[int, ...] | None,
                                                                              tuple[int, ...] | None]:
        """`(chunks, shards)` of an array of this spec and `shape` (None: Zarr's choice / none)."""
        if self.chunking == AUTO:
            if chunk_frames is not None:
                raise ValueError(f"{self.path} is not chunked by frames: give no chunk_frames")
            return None, None
        if chunk_frames is None:
            raise ValueError(f"{self.path} is chunked by frames: chunk_frames is needed")
        frames = (max(1, min(chunk_frames, shape[0])),) + tuple(shape[1:])
        if self.chunking == TILED:
            return (frames[0], min(MASK_TILE, shape[1]), min(MASK_TILE, shape[2])) + tuple(shape[3:]), frames
        return frames, None


CATALOGUE: dict[str, ArraySpec] = {}
"""Every array of every stage by its path `stage/name`."""


def _array(stage: str, name: str, shape: tuple[int | str, ...], dtype, chunking: str, doc: str) -> ArraySpec:
    spec = ArraySpec(stage, name, shape, np.dtype(dtype), chunking, doc)
    if spec.path in CATALOGUE:
        raise ValueError(f"{spec.path} declared twice")
    CATALOGUE[spec.path] = spec
    return spec


def _per_role(stage: str, name: str, shape, dtype, chunking: str, doc: str) -> dict[str, ArraySpec]:
    """`{role: spec}` of the arrays `<role>_<name>`, one per input video."""
    return {role: _array(stage, f"{role}_{name}", shape, dtype, chunking, doc) for role in ROLES}


# ------------------------------------------------------------------------------ face_crop
SOURCE_INDEX = _per_role(FACE_CROP, "index", ("T",), np.int64, FRAMES,
                         "source frame of each output frame (a ping-pong loop where the video is shorter)")
CROP_TRANSFORMS = _per_role(FACE_CROP, "transforms", ("T", 2, 3), np.float32, FRAMES,
                            "affine source frame px -> crop px")
FACE_FOUND = _per_role(FACE_CROP, "face_found", ("T",), bool, FRAMES,
                       "the detector found the face in the source frame")
LANDMARKS = _per_role(FACE_CROP, "landmarks", ("T", 68, 2), np.float32, FRAMES,
                      "iBUG-68 landmarks, crop px (identity: the smoothed track; lip_ref: each frame's own)")
IDENTITY_PASSTHROUGH = _array(FACE_CROP, "identity_passthrough", ("T",), bool, FRAMES,
                              "identity frames passed through unchanged (no face near them)")
MOUTH_MASKS = _array(FACE_CROP, "mouth_masks", ("T", "crop", "crop"), np.uint8, FRAMES,
                     "mouth mask weight * 255 (`tasks.common.mask_weights`)")

# ------------------------------------------------------------------------------- fit_3dmm
FIT_FIELDS = {
    "shape_coeffs": (("T", "K"), np.float32),
    "expression_coeffs": (("T", "E"), np.float32),
    "rotation": (("T", 3, 3), np.float32),
    "scale": (("T",), np.float32),
    "translation": (("T", 2), np.float32),
    "modelview": (("T", 4, 4), np.float32),
    "projection": (("T", 4, 4), np.float32),
    "fit_error": (("T",), np.float32),
}
"""The per-frame fields of `freetalk_core.fit_3dmm.FitResult`: shape and dtype."""
FIT = {role: {field: _array(FIT_3DMM, f"{role}_{field}", shape, dtype, FRAMES,
                            f"smoothed fit of the {role} video, per output frame")
              for field, (shape, dtype) in FIT_FIELDS.items()} for role in ROLES}
"""`FIT[role][field]`: the finished fits spread over the output frames."""
for _role in ROLES:
    FIT[_role]["size"] = _array(FIT_3DMM, f"{_role}_size", (), np.int64, AUTO,
                                "the crop side the fit was made in")
RAW_FIT = {field: _array(FIT_3DMM, f"raw_{field}", ("S",) + shape[1:], dtype, FRAMES,
                         "per-source-frame fits before smoothing")
           for field, (shape, dtype) in FIT_FIELDS.items()}
IDENTITY_SHAPE = _array(FIT_3DMM, "identity_shape", ("K",), np.float32, AUTO,
                        "the identity's shape coefficients, one for the clip")

# ----------------------------------------------------------------------- structure_render
STRUCTURE_LAYER = _array(STRUCTURE_RENDER, "frames", ("T", "crop", "crop", 3), np.uint8, TILED,
                         "structure frames where they differ from the identity crop, 0 elsewhere")
STRUCTURE_CHANGED = _array(STRUCTURE_RENDER, "changed", ("T", "crop", "crop"), bool, FRAMES,
                           "where the structure frame differs from the identity crop")

# ----------------------------------------------------------------------------- clip_embed
STRUCTURE_EMBEDDINGS = _array(CLIP_EMBED, "structure_embeddings", ("T", "N", "D"), np.float16, FRAMES,
                              "CLIP hidden states of the structure frames")
NEGATIVE_EMBEDDING = _array(CLIP_EMBED, "negative_embedding", ("N", "D"), np.float16, AUTO,
                            "CLIP hidden states of an all-zero input image")
IDENTITY_EMBEDDING = _array(CLIP_EMBED, "identity_embedding", (512,), np.float32, AUTO,
                            "ArcFace embedding of the identity, averaged over sampled frames")

# ----------------------------------------------------------------------------- controller
LIP_DISTANCE = _array(CONTROLLER, "lip_distance", ("T",), np.float32, AUTO,
                      "h_t: smoothed lip opening of the lip reference, crop px (`freetalk_core.lips`)")
LAMBDAS = _array(CONTROLLER, "lambdas", ("T",), np.float32, AUTO, "lambda_t, clipped to the lambda range")
ANCHOR_INDEX = _array(CONTROLLER, "anchor_index", (), np.int64, AUTO, "the anchor frame a")
ADJUSTED_EMBEDDINGS = _array(CONTROLLER, "embeddings", ("T", "N", "D"), np.float16, FRAMES,
                             "structure embeddings adjusted towards the anchor's")

# ------------------------------------------------------------------------------ diffusion
GENERATED_FRAMES = _array(DIFFUSION, "frames", ("T", "crop", "crop", 3), np.uint8, TILED,
                          "generated crops inside the mouth box, 0 outside it")

# --------------------------------------------------------------------------- optical_flow
GENERATED_FLOW = _array(OPTICAL_FLOW, "generated_flow", ("F", "h", "w", 2), np.int16, FRAMES,
                        "flow of the generated crops in the mouth box, multiples of FLOW_STEP px")
REFERENCE_FLOW = _array(OPTICAL_FLOW, "reference_flow", ("F", "h", "w", 2), np.int16, FRAMES,
                        "flow of the reference frames in the mouth box, multiples of FLOW_STEP px")

# --------------------------------------------------------------------------- noise_filter
FLOW_MEAN_GENERATED = _array(NOISE_FILTER, "flow_mean_generated", ("h", "w", 2), np.float64, AUTO,
                             "per-pixel mean of the generated flow over the clip, px")
FLOW_MEAN_REFERENCE = _array(NOISE_FILTER, "flow_mean_reference", ("h", "w", 2), np.float64, AUTO,
                             "per-pixel mean of the reference flow over the clip, px")
NOISE_PATTERN = _array(NOISE_FILTER, "noise_pattern", ("crop", "crop"), np.float32, AUTO,
                       "sigma per pixel (the mean of the sliding-window patterns), 0 outside the box")
FILTERED_FRAMES = _array(NOISE_FILTER, "frames", ("T", "crop", "crop", 3), np.uint8, TILED,
                         "filtered crops inside each frame's mouth mask, 0 outside it")

# ----------------------------------------------------------------------------- evaluation
FEATURES = {(kind, side): _array(EVALUATION, f"{kind}_{side}", (f"{kind}_rows", f"{kind}_width"), np.float32,
                                 AUTO, f"{kind} features of the {side} frames (FID / FVD, pooled over items)")
            for kind in ("inception", "i3d") for side in ("generated", "reference")}
"""`FEATURES[(kind, side)]`: kind inception (a row per frame) or i3d (a row per clip), side
generated or reference."""
FILTERED_FLOW = _array(EVALUATION, "filtered_flow", ("F", "h", "w", 2), np.int16, FRAMES,
                       "flow of the output crops in the mouth box (MNP after the filter), multiples of FLOW_STEP px")

STAGE_ATTRS: dict[str, tuple[str, ...]] = {
    FACE_CROP: ("n_frames", "fps", "identity_source_frames", "lip_ref_source_frames",
                "identity_frames_without_face", "identity_passthrough_frames",
                "lip_ref_frames_without_face", "box"),
    FIT_3DMM: ("identity_fit_error_px", "lip_ref_fit_error_px"),
    STRUCTURE_RENDER: (),
    CLIP_EMBED: (),
    CONTROLLER: ("anchor_index",),
    DIFFUSION: (),
    OPTICAL_FLOW: ("reference", "box"),
    NOISE_FILTER: ("mnp", "output", "output_sha256", "marked", "watermark_id", "label", "statistics_window",
                   "models"),
    EVALUATION: ("protocol", "notes", "models"),
}
"""The attributes each group may carry (small per-item results)."""


def stage_arrays(stage: str) -> list[ArraySpec]:
    """The arrays of one stage, in declaration order."""
    check_stage(stage)
    return [spec for spec in CATALOGUE.values() if spec.stage == stage]


def check_stage(stage: str) -> str:
    """`stage` if it names an item group (a stage or EVALUATION); else ValueError."""
    if stage not in GROUPS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(GROUPS)}")
    return stage
