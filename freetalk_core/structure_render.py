"""Structure render (METHOD.md step 3, Structurist part 2): the structure frames.

Each structure frame is the identity's face (the clip's identity shape, the identity frame's
pose, the identity's own texture) with the lip reference's mouth motion, rendered into the
identity crop's camera and blended over the identity crop in the lower face only.

Mouth motion. The six SFM blendshapes open a mouth too little (they follow the timing of the
lip reference but not its amplitude), so the mouth is driven by landmarks instead: the lip
reference's lip and chin landmarks, as displacements from its own most-closed frame, in its
face's normalised frame (roll removed, divided by the inter-ocular distance), are scaled to the
identity's inter-ocular distance in model space and moved onto the identity's lip and chin
vertices; a Gaussian radial-basis field spreads them smoothly over the lower face (upper-lip
motion above the mouth line, lower-lip and chin motion below it) and pins the nose and eyes.
Relative to each person's own closed mouth, a lip reference whose mouth is naturally open does
not make the identity gape.

Texture. The SFM has no colour model: a texture map in the SFM's UV layout is sampled from the
identity's most-closed-mouth frames, each texel weighted by how squarely its surface faces the
camera, and merged over those frames. The SFM's mouth is a hole; a dark cavity surface closes
it: what shows between parted lips is a mouth interior in the identity's colours, with no
teeth or tongue of the other person (the downstream CLIP structure embedding should see the
lip opening, not the lip reference's appearance).

Rendering goes through `Renderer` (rasterize per-vertex attributes): `ModernGLRenderer` on CPU
(an EGL standalone context; Mesa's llvmpipe where there is no GPU) or `NvdiffrastRenderer` on
CUDA. Both use OpenGL's conventions, so they give the same image.
"""

from __future__ import annotations

import abc

import cv2
import numpy as np

from freetalk_core import CROP_SIZE
from freetalk_core.fit_3dmm import FaceModel, FitResult, identity_shape, project_vertices
from freetalk_core.lips import closed_mouth_index, lip_opening, normalised_landmarks

TEXTURE_SIZE = 512
"""Side of the identity's texture map, in texels."""

MOUTH_INTERIOR_RGB = (52, 22, 24)
"""Colour of the mouth cavity: a dark, slightly red throat."""

UPPER_LIP = np.array([48, 49, 50, 51, 52, 53, 54, 60, 61, 62, 63, 64])
LOWER_LIP = np.array([48, 54, 55, 56, 57, 58, 59, 60, 64, 65, 66, 67])
CHIN = np.array([6, 7, 8, 9, 10])
LOWER_JAW_AND_LIP = np.array([5, 6, 7, 8, 9, 10, 11, 55, 56, 57, 58, 59, 65, 66, 67])
"""Landmarks that move down together when a mouth opens further."""
INNER_LIP_PAIRS = np.array([[61, 50], [62, 51], [63, 52], [65, 56], [66, 57], [67, 58]])
"""Inner-lip landmarks with the outer-lip landmark across the same lip."""
INNER_LIP_INSET = 0.1
"""How far into the lip (fraction of its thickness) the texture's inner lip edge is sampled.
Just enough to keep the teeth of a parted mouth out of the lips' texture; deeper insets take
the dark line between the lips out of it too, and a landmark detector then reads the opened
mouths of the structure frames as less open (Pearson 0.78 -> 0.94 on DreamTalk <- LipNet
going from 0.45 to 0.1, bench/structurist.py)."""
FIELD_REGULARISATION = 1e-2
"""Ridge added to the radial-basis system of the mouth rig's displacement field. A near-exact
fit (1e-6) is ill-conditioned with Gaussians this wide: a vertex's weights then sum, in absolute
value, to up to ~150, and the cheeks beside the mouth swing further than the lips; 1e-2 bounds
that to ~7 and moves the controls within a few percent of their targets (the lip opening is
matched exactly afterwards). Lip-transfer Pearson over the bench pairs: 0.937 -> 0.947."""
PINNED = np.concatenate([np.arange(17, 36), np.arange(36, 48), [0, 1, 2, 14, 15, 16]])
"""Landmarks whose vertices the mouth motion must not move: brows, nose, eyes, upper jaw."""


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


class Renderer(abc.ABC):
    """Rasterizes triangles and interpolates per-vertex attributes, with a depth test.

    Positions are image pixels (x right, y down, pixel centres at .5) plus a depth (larger is
    nearer the camera). `rasterize` returns the interpolated attributes (size, size, C) float32
    (zeros where no triangle covers a pixel) and the coverage (size, size) bool.
    """

    @abc.abstractmethod
    def rasterize(self, positions: np.ndarray, triangles: np.ndarray, attributes: np.ndarray,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
        """`(image (size, size, C) float32, coverage (size, size) bool)`."""


def _clip_positions(positions: np.ndarray, size: int) -> np.ndarray:
    """(N, 4) float32 clip-space positions; OpenGL's row order (row 0 = y 0 after read-back)."""
    positions = np.asarray(positions, dtype=np.float32)
    depth = positions[:, 2]
    near, far = float(depth.max()), float(depth.min())
    z = 0.98 * (1.0 - 2.0 * (depth - far) / max(near - far, 1e-6)) if len(depth) else depth
    x = 2.0 * positions[:, 0] / size - 1.0
    y = 2.0 * positions[:, 1] / size - 1.0
    return np.stack([x, y, z, np.ones_like(x)], axis=1).astype(np.float32)


class ModernGLRenderer(Renderer):
    """CPU (or any GL driver) rasterizer: a standalone EGL context of moderngl.

    On a machine without a GPU this is Mesa's llvmpipe: a 6,700-triangle mesh at 512 x 512
    renders and reads back in a few ms.
    """

    _VERTEX = """
        #version 330
        in vec4 in_position;
        in vec4 in_attribute;
        out vec4 value;
        void main() { gl_Position = in_position; value = in_attribute; }
    """
    _FRAGMENT = """
        #version 330
        in vec4 value;
        out vec4 colour;
        void main() { colour = value; }
    """

    def __init__(self, backend: str = "egl"):
        import moderngl

        self._moderngl = moderngl
        self.ctx = moderngl.create_standalone_context(backend=backend)
        self.program = self.ctx.program(vertex_shader=self._VERTEX, fragment_shader=self._FRAGMENT)
        self._framebuffers: dict[int, object] = {}

    def _framebuffer(self, size: int):
        if size not in self._framebuffers:
            colour = self.ctx.renderbuffer((size, size), 4, dtype="f4")
            depth = self.ctx.depth_renderbuffer((size, size))
            self._framebuffers[size] = self.ctx.framebuffer(color_attachments=[colour], depth_attachment=depth)
        return self._framebuffers[size]

    def rasterize(self, positions, triangles, attributes, size):
        attributes = np.asarray(attributes, dtype=np.float32)
        channels = attributes.shape[1]
        if channels > 3:
            raise ValueError(f"at most 3 attribute channels, got {channels}")
        packed = np.zeros((len(attributes), 4), np.float32)
        packed[:, :channels] = attributes
        packed[:, 3] = 1.0  # coverage
        data = np.concatenate([_clip_positions(positions, size), packed], axis=1)
        vbo = self.ctx.buffer(np.ascontiguousarray(data).tobytes())
        ibo = self.ctx.buffer(np.ascontiguousarray(triangles, dtype=np.int32).tobytes())
        vao = self.ctx.vertex_array(self.program, [(vbo, "4f 4f", "in_position", "in_attribute")], ibo)
        framebuffer = self._framebuffer(size)
        framebuffer.use()
        framebuffer.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        self.ctx.enable(self._moderngl.DEPTH_TEST)
        self.ctx.viewport = (0, 0, size, size)
        vao.render(self._moderngl.TRIANGLES)
        image = np.frombuffer(framebuffer.read(components=4, dtype="f4"), np.float32).reshape(size, size, 4)
        vao.release()
        vbo.release()
        ibo.release()
        return image[..., :channels].copy(), image[..., 3] > 0.5


class NvdiffrastRenderer(Renderer):
    """CUDA rasterizer (nvdiffrast, e.g. the `diffrp-nvdiffrast` package); needs CUDA torch."""

    def __init__(self, device: str = "cuda"):
        import torch

        try:
            import nvdiffrast.torch as dr
        except ImportError as error:
            raise ImportError("the nvdiffrast renderer needs nvdiffrast: pip install diffrp-nvdiffrast") from error
        self.torch, self.dr, self.device = torch, dr, device
        self.ctx = dr.RasterizeCudaContext(device=device)

    def rasterize(self, positions, triangles, attributes, size):
        torch = self.torch
        clip = torch.from_numpy(_clip_positions(positions, size)).to(self.device)[None]
        tri = torch.from_numpy(np.ascontiguousarray(triangles, dtype=np.int32)).to(self.device)
        attr = torch.from_numpy(np.ascontiguousarray(attributes, dtype=np.float32)).to(self.device)[None]
        rast, _ = self.dr.rasterize(self.ctx, clip, tri, resolution=[size, size])
        image, _ = self.dr.interpolate(attr, rast, tri)
        coverage = rast[0, ..., 3] > 0
        image = image[0] * coverage[..., None]
        return image.cpu().numpy().astype(np.float32), coverage.cpu().numpy()


def make_renderer(backend: str = "auto") -> Renderer:
    """A renderer: "nvdiffrast" (CUDA), "moderngl" (EGL; CPU via llvmpipe), or "auto" (CUDA if any)."""
    if backend == "nvdiffrast":
        return NvdiffrastRenderer()
    if backend == "moderngl":
        return ModernGLRenderer()
    if backend != "auto":
        raise ValueError(f"unknown renderer backend {backend!r}: use auto, moderngl or nvdiffrast")
    try:
        import torch

        if torch.cuda.is_available():
            return NvdiffrastRenderer()
    except ImportError:
        pass
    return ModernGLRenderer()


# ---------------------------------------------------------------------------------------------
# Lip colour and the lip reference's mouth motion
# ---------------------------------------------------------------------------------------------


def lip_colour_lab(image: np.ndarray, landmarks: np.ndarray, border_px: int = 2) -> np.ndarray:
    """(3,) float32 mean CIE Lab colour (L in 0-100) of the lips.

    The lips are the outer-lip polygon (48-59) minus the inner one (60-67), less `border_px`
    pixels along their edges: edge pixels mix the lip colour with the skin's and the mouth
    interior's, and a stretched, thin lip would be mostly edge (all of it is kept where the
    erosion would leave nothing). image: (H, W, 3) uint8 RGB; landmarks: (68, 2) px.
    """
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(landmarks[48:60]).astype(np.int32)], 1)
    cv2.fillPoly(mask, [np.round(landmarks[60:68]).astype(np.int32)], 0)
    if border_px > 0:
        eroded = cv2.erode(mask, np.ones((2 * border_px + 1,) * 2, np.uint8))
        mask = eroded if eroded.any() else mask
    if not mask.any():
        raise ValueError("the lip polygon covers no pixel")
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    return lab[mask > 0].mean(axis=0).astype(np.float32)


def mouth_motion(lip_landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) float32 the lip reference's landmark displacement from its most closed frame,
    in its normalised face frame (units of inter-ocular distance, y down)."""
    normalised = normalised_landmarks(lip_landmarks)
    return (normalised - normalised[closed_mouth_index(lip_landmarks)][None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The mesh: mouth cavity and the field that spreads the mouth motion
# ---------------------------------------------------------------------------------------------


def _boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """Closed loops of the mesh's boundary edges (edges of one triangle only), as vertex arrays."""
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    keys = np.sort(edges, axis=1)
    unique, counts = np.unique(keys, axis=0, return_counts=True)
    boundary = unique[counts == 1]
    neighbours: dict[int, list[int]] = {}
    for a, b in boundary:
        neighbours.setdefault(int(a), []).append(int(b))
        neighbours.setdefault(int(b), []).append(int(a))
    loops, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            candidates = [n for n in neighbours[current] if n != previous]
            nxt = candidates[0]
            if nxt == start or nxt in seen:
                break
            loop.append(nxt)
            seen.add(nxt)
            previous, current = current, nxt
        loops.append(np.array(loop))
    return loops


class MouthRig:
    """The identity's mesh with a mouth cavity, moved by lip and chin landmark displacements.

    Built from the identity shape and a closed-mouth expression (the base mesh) and from one
    reference frame of the identity (its pose and landmarks), where the chin landmarks, which
    eos maps only through the face contour, pick their nearest vertices.

    `vertices(motion)` moves the base mesh: `motion` (68, 2) float32 is a landmark displacement
    in a normalised face frame (units of inter-ocular distance, x right, y down); the lip and
    chin displacements are placed on their vertices in the model's x-y plane, scaled by the
    base mesh's inter-ocular distance, and a Gaussian radial-basis field spreads them: the
    upper lip's above the mouth line, the lower lip's and the chin's below it, zero at the
    eyes, brows, nose and upper jaw, faded out above the nose tip.
    """

    def __init__(self, model: FaceModel, shape_coeffs: np.ndarray, expression_coeffs: np.ndarray,
                 reference_landmarks: np.ndarray, reference_modelview: np.ndarray,
                 reference_projection: np.ndarray, size: int, sigma: float = 0.3):
        base = model.vertices(shape_coeffs, expression_coeffs)
        n = len(base)
        lv = model.landmark_vertex
        left_eye, right_eye = base[lv[36:42]].mean(0), base[lv[42:48]].mean(0)
        self.inter_ocular = float(np.linalg.norm((right_eye - left_eye)[:2]))

        loops = _boundary_loops(model.triangles)
        inner_lip_vertices = set(lv[60:68][lv[60:68] >= 0].tolist())
        self.mouth_loop = max(loops, key=lambda loop: len(inner_lip_vertices.intersection(loop.tolist())))
        outer_boundary = max(loops, key=len)

        # Chin points without a fixed vertex: the nearest vertex to the landmark in the
        # reference frame, among the face's outer boundary and the lower half of the mesh.
        projected = project_vertices(base, reference_modelview, reference_projection, size)
        candidates = np.flatnonzero(base[:, 1] < base[lv[57], 1])
        candidates = np.union1d(candidates, outer_boundary)
        vertex_of = {int(i): int(lv[i]) for i in range(68) if lv[i] >= 0}
        for point in CHIN:
            if point not in vertex_of:
                d = np.linalg.norm(projected[candidates, :2] - reference_landmarks[point], axis=1)
                vertex_of[int(point)] = int(candidates[np.argmin(d)])
        controls_up = [i for i in UPPER_LIP if i in vertex_of]
        controls_low = [i for i in np.concatenate([LOWER_LIP, CHIN]) if i in vertex_of]
        pinned = [vertex_of[i] for i in PINNED if i in vertex_of]
        pinned += [int(v) for v in outer_boundary if base[v, 1] > base[lv[33], 1]]

        # Which side of the mouth line each vertex is on (weight of the lower field): sharp at
        # the mouth, so the lips can part, and an ever smoother transition beside it, so the
        # cheeks do not tear along the line through the mouth corners. The mouth loop's own
        # vertices go with their lip, half and half at the mouth corners.
        xy = base[:, :2]
        loop_xy = xy[self.mouth_loop]
        order = np.argsort(loop_xy[:, 0])
        below_line = np.interp(xy[:, 0], loop_xy[order, 0], loop_xy[order, 1]) - xy[:, 1]
        beside = np.maximum(loop_xy[:, 0].min() - xy[:, 0], xy[:, 0] - loop_xy[:, 0].max())
        width = np.maximum(beside, 0.0) + 1e-3
        below = np.clip(0.5 + below_line / (2.0 * width), 0.0, 1.0)
        # The loop's two arcs between its corners (leftmost and rightmost vertex) are the
        # inner edges of the two lips: the one through the upper inner lip's centre is upper.
        # (Nearness in x-y cannot tell them apart: at a closed mouth they touch.)
        loop = list(self.mouth_loop)
        left, right = loop.index(int(self.mouth_loop[np.argmin(loop_xy[:, 0])])), loop.index(
            int(self.mouth_loop[np.argmax(loop_xy[:, 0])]))
        if left > right:
            left, right = right, left
        arc_a, arc_b = loop[left + 1:right], loop[right + 1:] + loop[:left]
        upper_arc, lower_arc = (arc_a, arc_b) if int(lv[62]) in arc_a else (arc_b, arc_a)
        below[upper_arc] = 0.0
        below[lower_arc] = 1.0
        below[[loop[left], loop[right]]] = 0.5
        self.below = below.astype(np.float32)

        scale = sigma * self.inter_ocular
        self.landmarks_up = np.array(controls_up)
        self.landmarks_low = np.array(controls_low)
        self.weights_up = self._field(base, [vertex_of[i] for i in controls_up], pinned, scale)
        self.weights_low = self._field(base, [vertex_of[i] for i in controls_low], pinned, scale)
        self.control_vertex = np.full(68, -1, np.int64)
        for i in np.concatenate([controls_up, controls_low]):
            self.control_vertex[i] = vertex_of[int(i)]
        nose_y = base[lv[33], 1]
        eye_y = (left_eye[1] + right_eye[1]) / 2
        fade = np.clip((eye_y - base[:, 1]) / max(eye_y - nose_y, 1e-6), 0.0, 1.0)
        fade[self.control_vertex[self.control_vertex >= 0]] = 1.0
        self.fade = (fade * fade * (3 - 2 * fade)).astype(np.float32)

        # The cavity: a ring just inside the mouth loop and behind it, closed by a point deep
        # in the mouth.
        loop_points = base[self.mouth_loop]
        centre = loop_points.mean(0)
        depth = 0.35 * self.inter_ocular
        ring = centre + 0.9 * (loop_points - centre) - np.array([0, 0, 0.15 * depth], np.float32)
        k = len(self.mouth_loop)
        ring_index, back_index = n + np.arange(k), n + k
        cavity = []
        for j in range(k):
            a, b = self.mouth_loop[j], self.mouth_loop[(j + 1) % k]
            ra, rb = ring_index[j], ring_index[(j + 1) % k]
            cavity += [(a, b, rb), (a, rb, ra), (ra, rb, back_index)]
        self.ring_offset = (ring - loop_points).astype(np.float32)
        self.back_offset = np.array([0, 0, -depth], np.float32)
        self.base = base
        self.n_model = n
        self.triangles = np.concatenate([model.triangles, np.array(cavity, np.int32)]).astype(np.int32)
        self.interior = np.zeros(n + k + 1, bool)
        self.interior[n:] = True

    @staticmethod
    def _field(base: np.ndarray, controls: list[int], pinned: list[int], scale: float) -> np.ndarray:
        """(N, C) float32: vertex displacement = weights @ control displacement (Gaussian RBF in
        the model's x-y plane, exact at the controls, zero at the pinned vertices)."""
        centres = np.concatenate([base[controls, :2], base[pinned, :2]])

        def kernel(a, b):
            d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
            return np.exp(-d2 / (2 * scale * scale))

        K = kernel(centres, centres) + FIELD_REGULARISATION * np.eye(len(centres))
        inverse = np.linalg.solve(K, np.eye(len(centres)))[:, : len(controls)]
        return (kernel(base[:, :2], centres) @ inverse).astype(np.float32)

    def vertices(self, motion: np.ndarray) -> np.ndarray:
        """(N + K, 3) float32 model-space vertices moved by `motion` (68, 2), cavity included."""
        d = np.zeros((68, 2), np.float32)
        d[:, 0] = motion[:, 0] * self.inter_ocular
        d[:, 1] = -motion[:, 1] * self.inter_ocular  # model y is up
        up = self.weights_up @ d[self.landmarks_up]
        low = self.weights_low @ d[self.landmarks_low]
        moved = self.base.copy()
        moved[:, :2] += (low * self.below[:, None] + up * (1 - self.below[:, None])) * self.fade[:, None]
        loop = moved[self.mouth_loop]
        ring = loop + self.ring_offset
        back = loop.mean(0) + self.back_offset
        return np.concatenate([moved, ring, back[None]]).astype(np.float32)

    def projected_opening(self, vertices: np.ndarray, landmark_vertex: np.ndarray, modelview: np.ndarray,
                          projection: np.ndarray, size: int) -> float:
        """The lip opening (see `lip_distance`, in inter-ocular distances, roll removed) of
        model-space `vertices` as this camera shows them; landmark_vertex: (68,) the model's."""
        points = np.zeros((68, 3), np.float32)
        mapped = landmark_vertex >= 0
        points[mapped] = vertices[landmark_vertex[mapped]]
        projected = project_vertices(points, modelview, projection, size)[None, :, :2]
        return float(lip_opening(projected)[0])

    def registration_motion(self, landmarks: np.ndarray, modelview: np.ndarray,
                            projection: np.ndarray, size: int) -> np.ndarray:
        """(68, 2) float32 motion that puts the lip and chin vertices onto `landmarks` (68, 2) px
        in a frame seen with this camera: the fit's residual there, in normalised units."""
        controls = np.flatnonzero(self.control_vertex >= 0)
        projected = project_vertices(self.base[self.control_vertex[controls]], modelview, projection, size)
        residual = landmarks[controls] - projected[:, :2]
        # The camera's 2 x 2 map from model x-y displacements to pixels (orthographic: exact).
        origin, ex, ey = project_vertices(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32),
                                          modelview, projection, size)[:, :2]
        jacobian = np.stack([ex - origin, ey - origin], axis=1)
        model_d = np.linalg.solve(jacobian, residual.T).T
        motion = np.zeros((68, 2), np.float32)
        motion[controls, 0] = model_d[:, 0] / self.inter_ocular
        motion[controls, 1] = -model_d[:, 1] / self.inter_ocular
        return motion


# ---------------------------------------------------------------------------------------------
# Texture from the identity frames
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Structure frames
# ---------------------------------------------------------------------------------------------


def lower_face_mask(landmarks: np.ndarray, size: int = CROP_SIZE, feather_px: float = 10.0) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the face below the nose (jaw points 2-14, nose base 31-35),
    feathered inwards so its edge does not show. landmarks: (68, 2) crop px."""
    points = np.asarray(landmarks, dtype=np.float64)
    polygon = np.concatenate([points[2:15], points[35:30:-1] + np.array([0.0, 4.0])])
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, shift=4)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    return np.clip(distance / feather_px, 0.0, 1.0).astype(np.float32)


class StructureFrames:
    """The structure frames of one pair, rendered one frame at a time.

    Built once (the rig, the texture, the target lip openings); `frame(t, identity_crop)` then
    renders frame t. Only the identity's `texture_frames` most closed-mouth crops are read at
    construction (`identity_crops[sorted frame numbers]`), so `identity_crops` may be any array
    indexable by an integer array (numpy, crops decoded on demand) and a long clip is rendered
    in chunks without holding all its crops.

    identity_crops: (T, S, S, 3) uint8 aligned identity crops; identity_landmarks: (T, 68, 2)
    float32 crop px; identity_fit: their FitResult (T frames); lip_landmarks: (T, 68, 2) float32
    crop px of the lip reference (its mouth motion comes from the landmarks, which follow the
    lips more closely than the fit does).
    texture_frames: how many of the identity's most closed-mouth frames the texture merges.
    own_frame_texture: texture each frame with its own colours where its surface faces the
    camera (better skin and lighting match; off by default: the identity's own mouth then
    shows through and the lip transfer drops: Pearson 0.85 -> 0.68 on one sample pair).
    match_opening: correct the lower lip and chin so the rendered mesh's outer-lip opening, as
    the identity's camera shows it, equals the identity's closed opening plus the lip
    reference's opening change.
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

        # The identity's own closed mouth: the rig's base, the texture's frames, the motion's origin.
        shape = identity_shape(identity_fit)
        anchor = closed_mouth_index(self.landmarks)
        opening = lip_opening(self.landmarks)
        closed = np.argsort(opening, kind="stable")[: max(1, min(texture_frames, T))]
        self.rig = rig = MouthRig(model, shape, identity_fit.expression_coeffs[anchor], self.landmarks[anchor],
                                  identity_fit.modelview[anchor], identity_fit.projection[anchor], identity_fit.size)
        picked = np.sort(closed)
        texture_crops = dict(zip(picked.tolist(), np.asarray(identity_crops[picked])))
        self.texture = extract_texture(self.renderer, model, rig, texture_crops, self.landmarks, identity_fit,
                                       [int(t) for t in closed])
        self.identity_mouth = rig.registration_motion(self.landmarks[anchor], identity_fit.modelview[anchor],
                                                      identity_fit.projection[anchor], identity_fit.size)

        n_extra = len(rig.interior) - len(model.uv)
        texture_uv = np.concatenate([model.uv, np.zeros((n_extra, 2), np.float32)]) * TEXTURE_SIZE
        self.attributes = np.concatenate([texture_uv, rig.interior[:, None].astype(np.float32)], axis=1)

        self.motion = mouth_motion(lip_landmarks)
        # Target opening: the identity's own closed mouth, opened as much as the lip reference's
        # is opened from its own closed mouth.
        reference = lip_opening(lip_landmarks)
        self.target = np.maximum(opening[anchor] + reference - reference[closed_mouth_index(lip_landmarks)], 0.0)
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
        # The lower lip and the chin follow the lip reference's opening exactly in the image:
        # the fit's lips, the rig's spreading and the identity's pose (a pitched head shows a
        # shorter mouth) each change it a little. Projection is linear: one step is exact.
        frame_motion = self.identity_mouth + self.motion[t]
        camera = (self.model.landmark_vertex, fit.modelview[t], fit.projection[t], size)
        shown = rig.projected_opening(rig.vertices(frame_motion), *camera)
        slope = rig.projected_opening(rig.vertices(frame_motion + self.drop), *camera) - shown
        if self.match_opening and abs(slope) > 1e-6:
            frame_motion = frame_motion + self.drop * ((self.target[t] - shown) / slope)
        vertices = rig.vertices(frame_motion)
        projected = project_vertices(vertices, fit.modelview[t], fit.projection[t], size)
        lookup, covered = self.renderer.rasterize(projected, rig.triangles, self.attributes, size)
        colour = cv2.remap(frame_texture, lookup[..., 0] - 0.5, lookup[..., 1] - 0.5, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        inside = np.clip(lookup[..., 2:3], 0.0, 1.0)
        colour = colour * (1 - inside) + np.array(MOUTH_INTERIOR_RGB, np.float32) * inside
        # The render's own edge, eroded and feathered, limits the blend (nothing behind the mesh).
        coverage = cv2.GaussianBlur(cv2.erode(covered.astype(np.float32), np.ones((5, 5))), (0, 0), 2.0)
        alpha = (lower_face_mask(self.landmarks[t], size) * coverage)[..., None]
        blended = identity_crop.astype(np.float32) * (1 - alpha) + colour * alpha
        return np.clip(np.round(blended), 0, 255).astype(np.uint8)


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
