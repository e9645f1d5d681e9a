"""Texture of the identity in the SFM's UV layout, sampled from its own frames.

The SFM has no colour model: a texture map in the SFM's UV layout is sampled from the
identity's usual closed-mouth frames, each texel weighted by how squarely its surface faces the
camera, and merged over those frames (`extract_texture`). `lip_colour_lab` measures the lips'
mean colour in an image from its landmarks, `lip_band_colour_lab` between any two lip outlines.
"""

from __future__ import annotations

import cv2
import numpy as np

from freetalk_core.fit_3dmm import FaceModel, FitResult, project_vertices
from freetalk_core.structure_render.mouth_rig import MouthRig
from freetalk_core.structure_render.renderers import Renderer

TEXTURE_SIZE = 512
"""Side of the identity's texture map, in texels."""

INNER_LIP_PAIRS = np.array([[61, 50], [62, 51], [63, 52], [65, 56], [66, 57], [67, 58]])
"""Inner-lip landmarks with the outer-lip landmark across the same lip."""
INNER_LIP_INSET = 0.1
"""How far into the lip (fraction of its thickness) the texture's inner lip edge is sampled.
Just enough to keep the teeth of a parted mouth out of the lips' texture; deeper insets take
the dark line between the lips out of it too, and a landmark detector then reads the opened
mouths of the structure frames as less open (Pearson 0.78 -> 0.94 on DreamTalk <- LipNet
going from 0.45 to 0.1, bench/structurist.py)."""


def lip_colour_lab(image: np.ndarray, landmarks: np.ndarray, border_px: int = 2) -> np.ndarray:
    """(3,) float32 mean CIE Lab colour (L in 0-100) of the lips: `lip_band_colour_lab` of the
    outer-lip polygon (48-59) and the inner one (60-67) of `landmarks` (68, 2) px."""
    return lip_band_colour_lab(image, landmarks[48:60], landmarks[60:68], border_px)


def lip_band_colour_lab(image: np.ndarray, outer: np.ndarray, inner: np.ndarray, border_px: int = 2) -> np.ndarray:
    """(3,) float32 mean CIE Lab colour (L in 0-100) of the lips between the polygons `outer`
    and `inner` ((K, 2) px each), less `border_px` pixels along their edges: edge pixels mix
    the lip colour with the skin's and the mouth interior's, and a stretched, thin lip would be
    mostly edge (all of it is kept where the erosion would leave nothing). image: (H, W, 3)
    uint8 RGB.
    """
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(outer).astype(np.int32)], 1)
    cv2.fillPoly(mask, [np.round(inner).astype(np.int32)], 0)
    if border_px > 0:
        eroded = cv2.erode(mask, np.ones((2 * border_px + 1,) * 2, np.uint8))
        mask = eroded if eroded.any() else mask
    if not mask.any():
        raise ValueError("the lip polygon covers no pixel")
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    return lab[mask > 0].mean(axis=0).astype(np.float32)




def _vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    face = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(normals, triangles[:, i], face)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)


def sample_texture(renderer: Renderer, model: FaceModel, rig: MouthRig, crop: np.ndarray,
                   landmarks: np.ndarray, modelview: np.ndarray, projection: np.ndarray,
                   rotation: np.ndarray, size: int = TEXTURE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One crop's colours in the SFM's UV layout: (size, size, 3) float32 RGB and the
    (size, size) float32 weight of each texel.

    The rig's mesh is first registered to the crop's lip and chin landmarks (68, 2) px, so the
    lips are sampled from the lips even where the fit is a few pixels off. A texel's weight is
    the squared cosine between its surface normal and the view direction (grazing views are
    blurred and unreliable), 0 where no surface maps to it. crop: (S, S, 3) uint8.
    """
    n = rig.n_model
    uv_positions = np.zeros((n, 3), np.float32)
    uv_positions[:, :2] = model.uv * size
    crop_size = crop.shape[0]
    # The inner lip edge is sampled a little inside the lips: at a closed or nearly closed
    # mouth the inner-lip landmarks lie on the dark line between the lips, which would
    # otherwise rim the lips of every opened mouth with a dark band.
    landmarks = np.array(landmarks, dtype=np.float32)
    inner, outer = INNER_LIP_PAIRS[:, 0], INNER_LIP_PAIRS[:, 1]
    landmarks[inner] += INNER_LIP_INSET * (landmarks[outer] - landmarks[inner])
    motion = rig.registration_motion(landmarks, modelview, projection, crop_size)
    vertices = rig.vertices(motion)[:n]
    projected = project_vertices(vertices, modelview, projection, crop_size)
    camera_normals = _vertex_normals(vertices, model.triangles) @ np.asarray(rotation).T
    facing = np.clip(camera_normals[:, 2], 0.0, 1.0) ** 2
    attributes = np.concatenate([projected[:, :2], facing[:, None]], axis=1)
    lookup, covered = renderer.rasterize(uv_positions, model.triangles, attributes, size)
    colour = cv2.remap(crop, lookup[..., 0] - 0.5, lookup[..., 1] - 0.5, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    return colour, (lookup[..., 2] * covered).astype(np.float32)


def extract_texture(renderer: Renderer, model: FaceModel, rig: MouthRig, crops: np.ndarray,
                    landmarks: np.ndarray, fit: FitResult, frames: np.ndarray,
                    size: int = TEXTURE_SIZE) -> np.ndarray:
    """(size, size, 3) float32 RGB texture in the SFM's UV layout, merged over `frames`: the
    weighted mean of `sample_texture` over those crops, texels no frame saw filled from their
    neighbours. crops: (T, S, S, 3) uint8, or anything that gives frame t's crop as `crops[t]`;
    landmarks: (T, 68, 2) crop px; frames: indices."""
    colour_sum = np.zeros((size, size, 3), np.float64)
    weight_sum = np.zeros((size, size), np.float64)
    for t in frames:
        colour, weight = sample_texture(renderer, model, rig, crops[t], landmarks[t], fit.modelview[t],
                                        fit.projection[t], fit.rotation[t], size)
        colour_sum += colour * weight[..., None]
        weight_sum += weight
    texture = colour_sum / np.maximum(weight_sum, 1e-6)[..., None]
    unseen = (weight_sum < 1e-3).astype(np.uint8)
    if unseen.any() and not unseen.all():
        texture = cv2.inpaint(np.clip(texture, 0, 255).astype(np.uint8), unseen, 3, cv2.INPAINT_TELEA)
    return texture.astype(np.float32)
