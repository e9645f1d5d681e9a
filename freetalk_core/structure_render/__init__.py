"""Structure render (METHOD.md step 3, Structurist part 2): the structure frames.

Each structure frame is the identity's face (the clip's identity shape, the identity frame's
pose, the identity's own texture) with the lip reference's mouth motion, rendered into the
identity crop's camera and blended over the identity crop in the lower face only, the
identity's jaw line and neck moved to meet the rendered chin.

The parts, one module each:
- `mouth_rig`: the identity's mesh with a mouth cavity, moved by the lip reference's lip and
  chin landmark displacements (relative to each person's own most-closed frame, so a lip
  reference whose mouth is naturally open does not make the identity gape);
- `texture`: the identity's texture map, sampled from its usual closed-mouth frames
  (`lips.typical_closed_frames`: lips touching, neither pressed nor pouted);
- `renderers`: the rasterizer (`ModernGLRenderer` on CPU, `NvdiffrastRenderer` on CUDA);
- `mouth_interior`: what shows between parted lips, painted in image space (a teeth hint, a
  shaded throat, the inner lip edge), nothing of the other person's mouth: the downstream CLIP
  structure embedding should see the lip opening, not the lip reference's appearance.
"""

from __future__ import annotations

import cv2
import numpy as np

from freetalk_core import CROP_SIZE
from freetalk_core.fit_3dmm import FaceModel, FitResult, identity_shape, project_vertices
from freetalk_core.lips import closed_mouth_index, lip_opening, typical_closed_frames
from freetalk_core.structure_render.mouth_interior import cavity_coverage, paint_mouth_interior, teeth_colour
from freetalk_core.structure_render.mouth_rig import CHIN, LOWER_JAW_AND_LIP, MouthRig, mouth_motion
from freetalk_core.structure_render.renderers import (
    ModernGLRenderer,
    NvdiffrastRenderer,
    Renderer,
    make_renderer,
)
from freetalk_core.structure_render.texture import (
    TEXTURE_SIZE,
    extract_texture,
    lip_band_colour_lab,
    lip_colour_lab,
    sample_texture,
)

__all__ = [
    "TEXTURE_SIZE", "ModernGLRenderer", "MouthRig", "NvdiffrastRenderer", "Renderer",
    "StructureFrames", "extract_texture", "lip_band_colour_lab", "lip_colour_lab", "lower_face_mask",
    "follow_chin", "make_renderer", "mouth_motion", "render_structure_frames", "sample_texture",
]

NECK_FOLLOW = 0.6
"""How far below the identity's jaw line its crop still moves with the rendered chin
(`follow_chin`), in inter-ocular distances. On 30 pairs of bench/structure_observers.py,
against the identity's crop blended unmoved: MediaPipe Pearson 0.784 -> 0.796 (1.0: 0.795),
dlib 0.941 -> 0.942."""


def lower_face_mask(landmarks: np.ndarray, size: int = CROP_SIZE, feather_px: float = 10.0) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the face below the nose (jaw points 2-14, nose base 31-35),
    feathered inwards so its edge does not show. landmarks: (68, 2) crop px."""
    points = np.asarray(landmarks, dtype=np.float64)
    polygon = np.concatenate([points[2:15], points[35:30:-1] + np.array([0.0, 4.0])])
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, shift=4)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    return np.clip(distance / feather_px, 0.0, 1.0).astype(np.float32)


def follow_chin(crop: np.ndarray, landmarks: np.ndarray, chin_points: np.ndarray, shift: np.ndarray,
                depth_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The identity crop with its jaw moved down by `shift` (K,) px at its jaw landmarks
    `chin_points` (K,) (negative: up), and the (68, 2) landmarks whose jaw line it then has.

    The shift is interpolated along the jaw, zero at jaw points 2 and 14, and moves each pixel
    column between them: fully from the lower lip to the jaw line, fading in from the nose base
    above and fading out over `depth_px` below, so the neck stretches or shrinks with it. Where
    the rendered chin is higher than the identity's own (its mouth open where the lip reference's
    is closed), the identity's own chin then does not show below the rendered one.
    crop: (S, S, 3) uint8; landmarks: (68, 2) crop px.
    """
    landmarks = np.asarray(landmarks, np.float32)
    xs = np.concatenate([[landmarks[2, 0]], landmarks[chin_points, 0], [landmarks[14, 0]]])
    shifts = np.concatenate([[0.0], np.clip(shift, -0.8 * depth_px, 0.8 * depth_px), [0.0]])
    order = np.argsort(xs, kind="stable")
    xs, shifts = xs[order], shifts[order]
    outline = landmarks.copy()
    outline[2:15, 1] += np.interp(landmarks[2:15, 0], xs, shifts)
    size = crop.shape[0]
    x0, x1 = max(int(np.floor(xs[0])), 0), min(int(np.ceil(xs[-1])) + 1, size)
    cols = np.arange(x0, x1, dtype=np.float32)
    column_shift = np.interp(cols, xs, shifts).astype(np.float32)
    if len(cols) == 0 or np.abs(column_shift).max() < 0.25:
        return crop, outline
    jaw = np.argsort(landmarks[2:15, 0], kind="stable") + 2
    jaw_y = np.interp(cols, landmarks[jaw, 0], landmarks[jaw, 1]).astype(np.float32)
    top = max(int(np.floor(landmarks[33, 1])), 0)
    bottom = min(int(np.ceil(jaw_y.max() + depth_px + np.abs(column_shift).max())) + 2, size)
    if bottom <= top:
        return crop, outline
    rows = np.arange(top, bottom, dtype=np.float32)[:, None]
    below = np.clip(1.0 - (rows - (jaw_y + np.maximum(column_shift, 0.0))[None]) / max(depth_px, 1.0), 0.0, 1.0)
    above = np.clip((rows - top) / max(float(landmarks[57, 1]) - top, 1.0), 0.0, 1.0)
    map_y = (rows - column_shift[None] * below * above).astype(np.float32)
    map_x = np.broadcast_to(cols[None], map_y.shape).astype(np.float32)
    moved = np.array(crop, copy=True)
    moved[top:bottom, x0:x1] = cv2.remap(np.asarray(crop), map_x, map_y, cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_REPLICATE)
    return moved, outline


class StructureFrames:
    """The structure frames of one pair, rendered one frame at a time.

    Built once (the rig, the texture, the target lip openings); `frame(t, identity_crop)` then
    renders frame t. Only the identity's `texture_frames` usual closed-mouth crops are read at
    construction (`identity_crops[sorted frame numbers]`), so `identity_crops` may be any array
    indexable by an integer array (numpy, crops decoded on demand) and a long clip is rendered
    in chunks without holding all its crops.

    identity_crops: (T, S, S, 3) uint8 aligned identity crops; identity_landmarks: (T, 68, 2)
    float32 crop px; identity_fit: their FitResult (T frames); lip_landmarks: (T, 68, 2) float32
    crop px of the lip reference (its mouth motion comes from the landmarks, which follow the
    lips more closely than the fit does).
    texture_frames: how many of the identity's usual closed-mouth frames
    (`lips.typical_closed_frames`) the texture merges, at most. Its most closed frames by the
    outer lips (`anchor`, the rig's base) press the lips together, their red partly hidden:
    sampled from those, the lips were paler and blurred where they differ in shape (over the
    132 pairs of bench/structure_observers.py, dlib's Pearson mean 0.963 -> 0.965, pairs below
    0.90 7 -> 3; MediaPipe's 0.851 -> 0.850).
    own_frame_texture: texture each frame with its own colours where its surface faces the
    camera (better skin and lighting match; off by default: the identity's own mouth then
    shows through and the lip transfer drops: Pearson 0.85 -> 0.68 on one sample pair).
    match_opening: correct the lower lip and chin so the rendered mesh's outer-lip opening, as
    the identity's camera shows it, equals the rig's closed opening plus the lip reference's
    opening change.
    `anchor` is the identity's most closed frame (`lips.closed_mouth_index`), the rig's base.
    """

    def __init__(self, model: FaceModel, identity_crops, identity_landmarks: np.ndarray,
                 identity_fit: FitResult, lip_landmarks: np.ndarray, renderer: Renderer | None = None,
                 texture_frames: int = 8, own_frame_texture: bool = False, match_opening: bool = True):
        T, size = identity_crops.shape[0], identity_crops.shape[1]
        if tuple(identity_crops.shape[1:]) != (size, size, 3) or identity_crops.dtype != np.uint8:
            raise ValueError(f"identity_crops must be (T, S, S, 3) uint8, got {identity_crops.shape} "
                             f"{identity_crops.dtype}")
        for name, array in (("identity_landmarks", identity_landmarks), ("lip_landmarks", lip_landmarks)):
            if np.shape(array) != (T, 68, 2):
                raise ValueError(f"{name} must be ({T}, 68, 2), got {np.shape(array)}")
        if len(identity_fit) != T:
            raise ValueError(f"identity_fit has {len(identity_fit)} frames, identity_crops {T}")
        self.model, self.fit, self.size, self.n_frames = model, identity_fit, size, T
        self.renderer = renderer or make_renderer()
        self.own_frame_texture = own_frame_texture
        self.match_opening = match_opening
        self.landmarks = np.asarray(identity_landmarks, np.float32)

        # The identity's most closed mouth: the rig's base and the target opening's origin; its
        # usual closed mouth: the texture's frames.
        shape = identity_shape(identity_fit)
        self.anchor = anchor = closed_mouth_index(self.landmarks)
        closed = typical_closed_frames(self.landmarks, min(texture_frames, T))
        self.rig = rig = MouthRig(model, shape, identity_fit.expression_coeffs[anchor], self.landmarks[anchor],
                                  identity_fit.modelview[anchor], identity_fit.projection[anchor], identity_fit.size)
        picked = np.sort(closed)
        texture_crops = dict(zip(picked.tolist(), np.asarray(identity_crops[picked])))
        self.texture = extract_texture(self.renderer, model, rig, texture_crops, self.landmarks, identity_fit,
                                       [int(t) for t in closed])
        # Teeth in the identity's light: scaled by its lower face's brightness.
        skin = lower_face_mask(self.landmarks[closed[0]], size) > 0.99
        self.teeth_rgb = teeth_colour(texture_crops[int(closed[0])][skin].mean(axis=0))
        camera = (model.landmark_vertex, identity_fit.modelview[anchor], identity_fit.projection[anchor],
                  identity_fit.size)
        self.identity_mouth = rig.uncrossed(rig.registration_motion(self.landmarks[anchor], *camera[1:]), *camera)

        self.attributes = model.uv[np.concatenate([np.arange(len(model.uv)), rig.cavity_source])] * TEXTURE_SIZE

        self.motion = mouth_motion(lip_landmarks)
        # Target opening: the rig's closed mouth (inner lips meeting), opened as much as the lip
        # reference's is opened from its own closed mouth. (From the identity's detected opening
        # instead, the lower lip of a mouth whose inner lips the detector crossed went back up
        # by as much as uncrossing moved it down, and crossed them again: over the 132 pairs of
        # bench/structure_observers.py, dlib's Pearson mean 0.961 -> 0.963, MediaPipe's 0.850 ->
        # 0.851, its minimum 0.563 -> 0.591.)
        closed_opening = rig.projected_opening(rig.vertices(self.identity_mouth), *camera)
        reference = lip_opening(lip_landmarks)
        self.target = np.maximum(closed_opening + reference - reference[closed_mouth_index(lip_landmarks)], 0.0)
        self.drop = np.zeros((68, 2), np.float32)
        self.drop[LOWER_JAW_AND_LIP, 1] = 0.05

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, t: int, identity_crop: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 structure frame t: `identity_crop` (S, S, 3) uint8, the identity's
        crop t, above the nose; the rendered face with the lip reference's mouth below it."""
        rig, fit, size = self.rig, self.fit, self.size
        identity_crop = np.asarray(identity_crop)
        # The frame's own colours where its surface faces the camera, the merged closed-mouth
        # texture elsewhere: the lighting and the skin match the identity frame around the mouth.
        frame_texture = self.texture
        if self.own_frame_texture:
            own, weight = sample_texture(self.renderer, self.model, rig, identity_crop, self.landmarks[t],
                                         fit.modelview[t], fit.projection[t], fit.rotation[t])
            own_share = np.clip(4.0 * weight, 0.0, 1.0)[..., None]
            frame_texture = self.texture * (1 - own_share) + own * own_share
        projected = self.projected_mesh(t)
        lookup, covered = self.renderer.rasterize(projected, rig.triangles, self.attributes, size)
        colour = cv2.remap(frame_texture, lookup[..., 0] - 0.5, lookup[..., 1] - 0.5, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        inter_ocular = float(np.linalg.norm(self.landmarks[t, 42:48].mean(0) - self.landmarks[t, 36:42].mean(0)))
        opened = cavity_coverage(*(projected[edge, :2] for edge in rig.inner_lip_edges()), size)
        colour = paint_mouth_interior(colour, opened, inter_ocular, self.teeth_rgb)
        # The identity's jaw and neck follow the rendered chin; the render's own edge, eroded and
        # feathered, limits the blend (nothing behind the mesh).
        vertex = rig.control_vertex[CHIN]
        mapped = vertex >= 0
        shift = projected[vertex[mapped], 1] - self.landmarks[t, CHIN[mapped], 1]
        identity_crop, outline = follow_chin(identity_crop, self.landmarks[t], CHIN[mapped], shift,
                                             NECK_FOLLOW * inter_ocular)
        coverage = cv2.GaussianBlur(cv2.erode(covered.astype(np.float32), np.ones((5, 5))), (0, 0), 2.0)
        mask = lower_face_mask(outline, size)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        shown = np.array(identity_crop, copy=True)
        if len(rows):
            box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            alpha = (mask[box] * coverage[box])[..., None]
            blended = identity_crop[box].astype(np.float32) * (1 - alpha) + colour[box] * alpha
            shown[box] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        return shown

    def projected_mesh(self, t: int) -> np.ndarray:
        """(N, 3) float32 frame t's rig vertices (cavity included) in crop px: the lip
        reference's mouth motion on the identity's closed mouth, seen by frame t's camera."""
        rig, fit = self.rig, self.fit
        # The lower lip and the chin follow the lip reference's opening exactly in the image:
        # the fit's lips, the rig's spreading and the identity's pose (a pitched head shows a
        # shorter mouth) each change it a little. Projection is linear: one step is exact.
        frame_motion = self.identity_mouth + self.motion[t]
        camera = (self.model.landmark_vertex, fit.modelview[t], fit.projection[t], self.size)
        shown = rig.projected_opening(rig.vertices(frame_motion), *camera)
        slope = rig.projected_opening(rig.vertices(frame_motion + self.drop), *camera) - shown
        if self.match_opening and abs(slope) > 1e-6:
            frame_motion = frame_motion + self.drop * ((self.target[t] - shown) / slope)
        return project_vertices(rig.vertices(frame_motion), fit.modelview[t], fit.projection[t], self.size)

    def lip_outline(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Where frame t shows the lips, in crop px: the outer lip edge (12, 2) (the outer-lip
        landmarks' vertices, 48-59) and the inner lip edge (K, 2) (the upper edge from corner
        to corner, then the lower edge back)."""
        projected = self.projected_mesh(t)[:, :2]
        outer = projected[self.model.landmark_vertex[48:60]]
        upper, lower = (projected[edge] for edge in self.rig.inner_lip_edges())
        return outer, np.concatenate([upper[np.argsort(upper[:, 0])], lower[np.argsort(-lower[:, 0])]])


def render_structure_frames(
    model: FaceModel,
    identity_crops: np.ndarray,
    identity_landmarks: np.ndarray,
    identity_fit: FitResult,
    lip_landmarks: np.ndarray,
    lip_fit: FitResult | None = None,
    renderer: Renderer | None = None,
    texture_frames: int = 8,
    own_frame_texture: bool = False,
    match_opening: bool = True,
) -> np.ndarray:
    """All the structure frames of a pair at once (see `StructureFrames` for the arguments;
    lip_fit is accepted for symmetry and not used).

    Returns (T, S, S, 3) uint8: equal to the identity crop above the nose, the rendered face
    with the lip reference's mouth opening below it.
    """
    identity_crops = np.asarray(identity_crops)
    frames = StructureFrames(model, identity_crops, identity_landmarks, identity_fit, lip_landmarks, renderer,
                             texture_frames, own_frame_texture, match_opening)
    return np.stack([frames.frame(t, identity_crops[t]) for t in range(len(frames))])