"""3DMM fit (METHOD.md step 2, Structurist part 1): the Surrey Face Model fitted to landmarks.

eos fits, per frame, the SFM shape (63 PCA coefficients), the 6 expression blendshapes and an
orthographic camera to the iBUG-68 landmarks of a face crop. The identity's shape is then
estimated once for the whole clip (`identity_shape`), so it does not jitter from frame to frame;
its pose stays per frame. The structure render (step 3) takes the identity's shape and pose
from here; the mouth it renders follows the lip reference's landmarks (the landmark-driven
mouth rig of METHOD.md's accepted design), not the blendshapes, which follow the lips' timing
but not their amplitude.

Model-space vertices are (N, 3) float32 with N = 3448 (SFM units, y up). A fitted camera maps
them to crop pixels with `project_vertices`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from freetalk_core import CROP_SIZE
from freetalk_core.errors import ModelFileError
from freetalk_core.models.layout import EOS_FILES

LANDMARK_NAMES = [str(i + 1) for i in range(68)]
"""eos names the iBUG-68 landmarks with 1-based strings; 0-based names silently map wrongly."""


@dataclass
class FaceModel:
    """The SFM with expression blendshapes, everything eos needs to fit it, and its arrays.

    mean: (N, 3) float32 mean shape; shape_basis: (N, 3, 63) float32 rescaled PCA basis;
    blendshapes: (6, N, 3) float32; triangles: (F, 3) int32; uv: (N, 2) float32 texture
    coordinates in [0, 1]; landmark_vertex: (68,) int64 the SFM vertex of each iBUG landmark,
    -1 where the mapping has none (the jaw contour, the inner lip corners).
    """

    morphable_model: object
    landmark_mapper: object
    edge_topology: object
    contour_landmarks: object
    model_contour: object
    mean: np.ndarray
    shape_basis: np.ndarray
    blendshapes: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    landmark_vertex: np.ndarray

    @property
    def n_shape(self) -> int:
        return self.shape_basis.shape[2]

    @property
    def n_expression(self) -> int:
        return self.blendshapes.shape[0]

    def vertices(self, shape_coeffs: np.ndarray, expression_coeffs: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) float32 model-space vertices for (63,) shape and (6,) expression coefficients."""
        v = self.mean + self.shape_basis @ np.asarray(shape_coeffs, dtype=np.float32)
        if expression_coeffs is not None:
            v = v + np.tensordot(np.asarray(expression_coeffs, dtype=np.float32), self.blendshapes, axes=1)
        return v.astype(np.float32)


@dataclass
class FitResult:
    """Per-frame eos fits of a clip.

    shape_coeffs: (T, 63) float32; expression_coeffs: (T, 6) float32;
    rotation: (T, 3, 3) float32 model -> camera rotation; scale: (T,) float32 px per model unit;
    translation: (T, 2) float32 crop px of the model origin; modelview, projection: (T, 4, 4)
    float32 eos' orthographic camera; fit_error: (T,) float32 mean distance in px between the
    landmarks and their projected model vertices; size: the crop side the fit was made in.
    """

    shape_coeffs: np.ndarray
    expression_coeffs: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    translation: np.ndarray
    modelview: np.ndarray
    projection: np.ndarray
    fit_error: np.ndarray
    size: int = CROP_SIZE

    def __len__(self) -> int:
        return len(self.fit_error)


def load_face_model(eos_dir: str | Path) -> FaceModel:
    """Load the SFM shape model, its 6 expression blendshapes and the fitting files from `eos_dir`.

    Raises ModelFileError naming the first missing file.
    """
    import eos

    eos_dir = Path(eos_dir)
    for name in EOS_FILES.values():
        if not (eos_dir / name).is_file():
            raise ModelFileError(
                f"missing 3DMM file {eos_dir / name}: run `freetalk models tiny DIR` or "
                "`freetalk models download DIR`"
            )
    shape_only = eos.morphablemodel.load_model(str(eos_dir / EOS_FILES["shape"]))
    blendshapes = eos.morphablemodel.load_blendshapes(str(eos_dir / EOS_FILES["blendshapes"]))
    # fit_shape_and_pose needs the blendshapes inside the model ("bad optional access" otherwise),
    # and that constructor needs a colour model (an empty one) and the SFM's texture coordinates.
    morphable_model = eos.morphablemodel.MorphableModel(
        shape_only.get_shape_model(),
        blendshapes,
        color_model=eos.morphablemodel.PcaModel(),
        vertex_definitions=None,
        texture_coordinates=shape_only.get_texture_coordinates(),
    )
    mapper = eos.core.LandmarkMapper(str(eos_dir / EOS_FILES["mapper"]))
    edge_topology = eos.morphablemodel.load_edge_topology(str(eos_dir / EOS_FILES["edge_topology"]))
    contour_landmarks = eos.fitting.ContourLandmarks.load(str(eos_dir / EOS_FILES["mapper"]))
    model_contour = eos.fitting.ModelContour.load(str(eos_dir / EOS_FILES["contours"]))

    shape_model = shape_only.get_shape_model()
    n_vertices = len(np.asarray(shape_model.get_mean())) // 3
    mean = np.asarray(shape_model.get_mean(), dtype=np.float32).reshape(n_vertices, 3)
    basis = np.asarray(shape_model.get_rescaled_pca_basis(), dtype=np.float32)
    basis = basis.reshape(n_vertices, 3, -1)
    deformations = np.stack([np.asarray(b.deformation, dtype=np.float32) for b in blendshapes])
    landmark_vertex = np.full(68, -1, dtype=np.int64)
    for index, name in enumerate(LANDMARK_NAMES):
        vertex = mapper.convert(name)
        if vertex is not None:
            landmark_vertex[index] = int(vertex)
    return FaceModel(
        morphable_model=morphable_model,
        landmark_mapper=mapper,
        edge_topology=edge_topology,
        contour_landmarks=contour_landmarks,
        model_contour=model_contour,
        mean=mean,
        shape_basis=basis,
        blendshapes=deformations.reshape(len(blendshapes), n_vertices, 3),
        triangles=np.asarray(shape_model.get_triangle_list(), dtype=np.int32),
        uv=np.asarray(shape_only.get_texture_coordinates(), dtype=np.float32),
        landmark_vertex=landmark_vertex,
    )


def project_vertices(vertices: np.ndarray, modelview: np.ndarray, projection: np.ndarray, size: int) -> np.ndarray:
    """Project (N, 3) model-space vertices with eos' orthographic camera into a size x size image.

    Returns (N, 3) float32: x, y in image px (y down) and the camera-space depth z (larger is
    nearer the camera).
    """
    homogeneous = np.concatenate([vertices, np.ones((len(vertices), 1), np.float32)], axis=1)
    camera = homogeneous @ np.asarray(modelview, np.float32).T
    ndc = camera @ np.asarray(projection, np.float32).T
    x = (ndc[:, 0] + 1.0) * size / 2.0
    y = size - (ndc[:, 1] + 1.0) * size / 2.0
    return np.stack([x, y, camera[:, 2]], axis=1).astype(np.float32)


def fit_frame_vertices(model: FaceModel, fit: FitResult, t: int, shape_coeffs: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) float32 crop-space projection (x, y px, depth) of frame `t`'s fitted mesh.

    With `shape_coeffs` (63,), that shape replaces the frame's own (e.g. the clip's identity shape).
    """
    shape = fit.shape_coeffs[t] if shape_coeffs is None else shape_coeffs
    vertices = model.vertices(shape, fit.expression_coeffs[t])
    return project_vertices(vertices, fit.modelview[t], fit.projection[t], fit.size)


def fit_landmarks(
    model: FaceModel,
    landmarks: np.ndarray,
    size: int = CROP_SIZE,
    num_iterations: int = 5,
    smooth_window: int = 5,
) -> FitResult:
    """Fit shape, expression and pose to every frame's landmarks with eos (contours included).

    landmarks: (T, 68, 2) float32 crop px (iBUG-68, 0-based order) in a size x size crop.
    smooth_window: pose and expression are then smoothed over time with `smooth_fit` (this
    many frames, centred; 1 or less: per-frame fits as eos gives them).
    Returns a FitResult of T frames.
    """
    return finish_fit(model, fit_frames(model, landmarks, size, num_iterations), landmarks, smooth_window)


def fit_frames(model: FaceModel, landmarks: np.ndarray, size: int = CROP_SIZE,
               num_iterations: int = 5) -> FitResult:
    """The per-frame eos fits of `fit_landmarks`, before smoothing (`fit_error` left 0). Frames
    are fitted independently, so a clip may be fitted a chunk at a time."""
    import eos

    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"expected landmarks (T, 68, 2), got {landmarks.shape}")
    out = {k: [] for k in ("shape", "expr", "rot", "scale", "trans", "mv", "proj")}
    for frame_landmarks in landmarks:
        eos_landmarks = [
            eos.core.Landmark(name, frame_landmarks[i].reshape(2, 1))
            for i, name in enumerate(LANDMARK_NAMES)
        ]
        _, pose, shape_coeffs, expression_coeffs = eos.fitting.fit_shape_and_pose(
            model.morphable_model,
            eos_landmarks,
            model.landmark_mapper,
            size,
            size,
            model.edge_topology,
            model.contour_landmarks,
            model.model_contour,
            num_iterations,
        )
        modelview = np.asarray(pose.get_modelview(), dtype=np.float32)
        projection = np.asarray(pose.get_projection(), dtype=np.float32)
        shape_coeffs = np.asarray(shape_coeffs, dtype=np.float32)
        expression_coeffs = np.asarray(expression_coeffs, dtype=np.float32)
        origin, scale = _camera_origin_and_scale(modelview, projection, size)
        out["shape"].append(shape_coeffs)
        out["expr"].append(expression_coeffs)
        out["rot"].append(modelview[:3, :3])
        out["scale"].append(scale)
        out["trans"].append(origin)
        out["mv"].append(modelview)
        out["proj"].append(projection)
    fit = FitResult(
        shape_coeffs=np.array(out["shape"], np.float32).reshape(-1, model.n_shape),
        expression_coeffs=np.array(out["expr"], np.float32).reshape(-1, model.n_expression),
        rotation=np.array(out["rot"], np.float32).reshape(-1, 3, 3),
        scale=np.array(out["scale"], np.float32),
        translation=np.array(out["trans"], np.float32).reshape(-1, 2),
        modelview=np.array(out["mv"], np.float32).reshape(-1, 4, 4),
        projection=np.array(out["proj"], np.float32).reshape(-1, 4, 4),
        fit_error=np.zeros(len(landmarks), np.float32),
        size=size,
    )
    return fit


def finish_fit(model: FaceModel, fit: FitResult, landmarks: np.ndarray, smooth_window: int = 5) -> FitResult:
    """The whole clip's part of `fit_landmarks`: smoothing over time (`smooth_fit`, if
    `smooth_window > 1`), then the fit errors against `landmarks` (T, 68, 2)."""
    if smooth_window > 1 and len(fit) >= 3:
        fit = smooth_fit(fit, smooth_window)
    else:
        fit = replace(fit)
    fit.fit_error = _fit_errors(model, fit, np.asarray(landmarks, dtype=np.float32))
    return fit


def _camera_origin_and_scale(modelview: np.ndarray, projection: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The orthographic camera's image of the model origin (2,) px and its px per model unit."""
    origin, unit_x = project_vertices(np.eye(4, dtype=np.float32)[[3, 0], :3], modelview, projection, size)[:, :2]
    return origin, float(np.linalg.norm(unit_x - origin))


def _fit_errors(model: FaceModel, fit: FitResult, landmarks: np.ndarray) -> np.ndarray:
    """(T,) float32 mean px distance between the landmarks and their fitted, projected vertices."""
    mapped = model.landmark_vertex >= 0
    errors = []
    for t in range(len(fit)):
        vertices = model.vertices(fit.shape_coeffs[t], fit.expression_coeffs[t])[model.landmark_vertex[mapped]]
        projected = project_vertices(vertices, fit.modelview[t], fit.projection[t], fit.size)
        errors.append(np.linalg.norm(projected[:, :2] - landmarks[t][mapped], axis=1).mean())
    return np.array(errors, np.float32)


def smooth_fit(fit: FitResult, window: int = 5) -> FitResult:
    """The fit with pose and expression smoothed over time, without lag.

    A centred Savitzky-Golay filter (quadratic, `window` frames, odd, at most the clip's
    length) runs over the expression coefficients, the camera's translation and projection and
    the rotation matrices' entries; each smoothed rotation is then made a rotation again (its
    nearest one, by SVD). Linear and quadratic motion passes unchanged, frame-to-frame
    jitter of the per-frame fits is averaged out. Shape coefficients stay per frame
    (`identity_shape` takes their robust average). Returns a new FitResult.
    """
    from scipy.signal import savgol_filter

    n = len(fit)
    window = min(window if window % 2 else window + 1, n if n % 2 else n - 1)
    if window < 3:
        return replace(fit)

    def smooth(values: np.ndarray) -> np.ndarray:
        return savgol_filter(values.astype(np.float64), window, 2, axis=0, mode="interp")

    rotation = smooth(fit.modelview[:, :3, :3])
    u, _, vt = np.linalg.svd(rotation)
    fix = np.ones((n, 3))
    fix[:, 2] = np.sign(np.linalg.det(u @ vt))
    rotation = (u * fix[:, None, :]) @ vt
    modelview = fit.modelview.astype(np.float64).copy()
    modelview[:, :3, :3] = rotation
    modelview[:, :3, 3] = smooth(fit.modelview[:, :3, 3])
    projection = smooth(fit.projection)
    cameras = [_camera_origin_and_scale(mv, pr, fit.size) for mv, pr in zip(modelview, projection)]
    return replace(
        fit,
        expression_coeffs=smooth(fit.expression_coeffs).astype(np.float32),
        rotation=rotation.astype(np.float32),
        scale=np.array([scale for _, scale in cameras], np.float32),
        translation=np.array([origin for origin, _ in cameras], np.float32).reshape(-1, 2),
        modelview=modelview.astype(np.float32),
        projection=projection.astype(np.float32),
    )


def identity_shape(fit: FitResult) -> np.ndarray:
    """(63,) float32 one shape estimate for the clip: the per-coefficient median of the good fits.

    Frames whose fit error exceeds twice the clip's median error (a blink, a blurred frame, a
    tracking slip) are left out; the median is robust to the remaining outliers.
    """
    if len(fit) == 0:
        raise ValueError("identity_shape needs at least one fitted frame")
    good = fit.fit_error <= 2.0 * np.median(fit.fit_error)
    return np.median(fit.shape_coeffs[good], axis=0).astype(np.float32)
