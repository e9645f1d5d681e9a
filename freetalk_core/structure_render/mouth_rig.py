"""The mouth rig: the identity's mesh with a mouth cavity, moved by landmark displacements.

The six SFM blendshapes open a mouth too little (they follow the timing of the lip reference
but not its amplitude), so the mouth is driven by landmarks instead: the lip reference's lip
and chin landmarks, as displacements from its own most-closed frame, in its face's normalised
frame (roll removed, divided by the inter-ocular distance; `mouth_motion`), are scaled to the
identity's inter-ocular distance in model space and moved onto the identity's lip and chin
vertices; a Gaussian radial-basis field spreads them smoothly over the lower face (upper-lip
motion above the mouth line, lower-lip and chin motion below it) and pins the nose and eyes.
The SFM's mouth is a hole; the rig closes it with a cavity surface behind the lips.
"""

from __future__ import annotations

import numpy as np

from freetalk_core.fit_3dmm import FaceModel, project_vertices
from freetalk_core.lips import (
    INNER_LIP_PAIRS,
    OUTER_LIP_PAIRS,
    closed_mouth_index,
    lip_opening,
    normalised_landmarks,
)

UPPER_LIP = np.array([48, 49, 50, 51, 52, 53, 54, 60, 61, 62, 63, 64])
LOWER_LIP = np.array([48, 54, 55, 56, 57, 58, 59, 60, 64, 65, 66, 67])
CHIN = np.array([6, 7, 8, 9, 10])
LOWER_JAW_AND_LIP = np.array([5, 6, 7, 8, 9, 10, 11, 55, 56, 57, 58, 59, 65, 66, 67])
"""Landmarks that move down together when a mouth opens further."""
FIELD_REGULARISATION = 1e-2
"""Ridge added to the radial-basis system of the mouth rig's displacement field. A near-exact
fit (1e-6) is ill-conditioned with Gaussians this wide: a vertex's weights then sum, in absolute
value, to up to ~150, and the cheeks beside the mouth swing further than the lips; 1e-2 bounds
that to ~7 and moves the controls within a few percent of their targets (the lip opening is
matched exactly afterwards). Lip-transfer Pearson over the bench pairs: 0.937 -> 0.947."""
CORNER_SPREAD = 3.0
"""Beside the mouth corners, the upper and lower fields blend over a band this many times as
tall as the distance from the corner: a narrower band shears the cheek into a crease running
from the corner when the mouth opens wide."""
INNER_EDGE_ROUNDING = 1.0
"""How far each inner lip edge is moved onto its lens shape (`MouthRig._round_inner_edge`)."""
LENS_POWER = 0.75
"""Exponent of the lens profile: 1 a parabola, 0.5 an ellipse's rounder corners."""
PINNED = np.concatenate([np.arange(17, 36), np.arange(36, 48), [0, 1, 2, 14, 15, 16]])
"""Landmarks whose vertices the mouth motion must not move: brows, nose, eyes, upper jaw."""


def mouth_motion(lip_landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) float32 the lip reference's landmark displacement from its most closed frame,
    in its normalised face frame (units of inter-ocular distance, y down)."""
    normalised = normalised_landmarks(lip_landmarks)
    return (normalised - normalised[closed_mouth_index(lip_landmarks)][None]).astype(np.float32)


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
        self.base, self.n_model = base, len(base)
        lv = model.landmark_vertex
        left_eye, right_eye = base[lv[36:42]].mean(0), base[lv[42:48]].mean(0)
        self.inter_ocular = float(np.linalg.norm((right_eye - left_eye)[:2]))

        loops = _boundary_loops(model.triangles)
        inner_lip_vertices = set(lv[60:68][lv[60:68] >= 0].tolist())
        self.mouth_loop = max(loops, key=lambda loop: len(inner_lip_vertices.intersection(loop.tolist())))
        outer_boundary = max(loops, key=len)

        vertex_of = self._landmark_vertices(lv, outer_boundary, reference_landmarks, reference_modelview,
                                            reference_projection, size)
        self.below = self._lower_side(lv)
        self._build_fields(vertex_of, lv, outer_boundary, sigma)
        self.fade = self._upper_face_fade(lv, left_eye, right_eye)
        self._build_cavity(model.triangles)

    def _landmark_vertices(self, lv: np.ndarray, outer_boundary: np.ndarray, reference_landmarks: np.ndarray,
                           reference_modelview: np.ndarray, reference_projection: np.ndarray,
                           size: int) -> dict[int, int]:
        """Landmark -> vertex: the model's mapping, and for the chin points without a fixed
        vertex the nearest vertex to the landmark in the reference frame, among the face's
        outer boundary and the lower half of the mesh."""
        base = self.base
        projected = project_vertices(base, reference_modelview, reference_projection, size)
        candidates = np.flatnonzero(base[:, 1] < base[lv[57], 1])
        candidates = np.union1d(candidates, outer_boundary)
        vertex_of = {int(i): int(lv[i]) for i in range(68) if lv[i] >= 0}
        for point in CHIN:
            if point not in vertex_of:
                d = np.linalg.norm(projected[candidates, :2] - reference_landmarks[point], axis=1)
                vertex_of[int(point)] = int(candidates[np.argmin(d)])
        return vertex_of

    def _lower_side(self, lv: np.ndarray) -> np.ndarray:
        """(N,) float32 which side of the mouth line each vertex is on (the weight of the lower
        field): sharp at the mouth, so the lips can part, and an ever smoother transition
        beside it, so the cheeks do not tear along the line through the mouth corners. The
        mouth loop's own vertices go with their lip, half and half at the mouth corners."""
        xy = self.base[:, :2]
        loop_xy = xy[self.mouth_loop]
        order = np.argsort(loop_xy[:, 0])
        below_line = np.interp(xy[:, 0], loop_xy[order, 0], loop_xy[order, 1]) - xy[:, 1]
        beside = np.maximum(loop_xy[:, 0].min() - xy[:, 0], xy[:, 0] - loop_xy[:, 0].max())
        width = CORNER_SPREAD * np.maximum(beside, 0.0) + 1e-3
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
        self.arcs = (np.array(upper_arc, np.int64), np.array(lower_arc, np.int64))
        self.corners = np.array([loop[left], loop[right]], np.int64)
        return below.astype(np.float32)

    def _build_fields(self, vertex_of: dict[int, int], lv: np.ndarray, outer_boundary: np.ndarray,
                      sigma: float) -> None:
        """The upper and lower displacement fields, from their control landmarks, zero at the
        pinned vertices (`PINNED` and the face's outer boundary above the nose tip)."""
        base = self.base
        controls_up = [i for i in UPPER_LIP if i in vertex_of]
        controls_low = [i for i in np.concatenate([LOWER_LIP, CHIN]) if i in vertex_of]
        pinned = [vertex_of[i] for i in PINNED if i in vertex_of]
        pinned += [int(v) for v in outer_boundary if base[v, 1] > base[lv[33], 1]]
        scale = sigma * self.inter_ocular
        self.landmarks_up = np.array(controls_up)
        self.landmarks_low = np.array(controls_low)
        self.weights_up = self._field(base, [vertex_of[i] for i in controls_up], pinned, scale)
        self.weights_low = self._field(base, [vertex_of[i] for i in controls_low], pinned, scale)
        self.control_vertex = np.full(68, -1, np.int64)
        for i in np.concatenate([controls_up, controls_low]):
            self.control_vertex[i] = vertex_of[int(i)]

    def _upper_face_fade(self, lv: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
        """(N,) float32 how much of the field moves each vertex: 1 below the nose tip, fading
        smoothly to 0 at the eyes; always 1 at the control vertices."""
        base = self.base
        nose_y = base[lv[33], 1]
        eye_y = (left_eye[1] + right_eye[1]) / 2
        fade = np.clip((eye_y - base[:, 1]) / max(eye_y - nose_y, 1e-6), 0.0, 1.0)
        fade[self.control_vertex[self.control_vertex >= 0]] = 1.0
        return (fade * fade * (3 - 2 * fade)).astype(np.float32)

    def _build_cavity(self, model_triangles: np.ndarray) -> None:
        """The cavity: a copy of the mouth loop (the inner lip edge), a ring just inside it and
        behind it, and a point deep in the mouth that closes it. Its vertices are its own (the
        face mesh's loop vertices are not shared), so what is cavity and what is lip has a hard
        edge; `cavity_source` gives the face vertex each one copies its texture coordinate from
        (its loop vertex)."""
        n = self.n_model
        loop_points = self.base[self.mouth_loop]
        centre = loop_points.mean(0)
        depth = 0.35 * self.inter_ocular
        ring = centre + 0.9 * (loop_points - centre) - np.array([0, 0, 0.15 * depth], np.float32)
        k = len(self.mouth_loop)
        edge_index, ring_index, back_index = n + np.arange(k), n + k + np.arange(k), n + 2 * k
        cavity = []
        for j in range(k):
            a, b = edge_index[j], edge_index[(j + 1) % k]
            ra, rb = ring_index[j], ring_index[(j + 1) % k]
            cavity += [(a, b, rb), (a, rb, ra), (ra, rb, back_index)]
        self.ring_offset = (ring - loop_points).astype(np.float32)
        self.back_offset = np.array([0, 0, -depth], np.float32)
        self.triangles = np.concatenate([model_triangles, np.array(cavity, np.int32)]).astype(np.int32)
        self.cavity_source = np.concatenate([self.mouth_loop, self.mouth_loop, self.mouth_loop[:1]]).astype(np.int64)

    def inner_lip_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Vertex indices of the upper and the lower inner lip edge, the mouth corners included."""
        left, right = self.corners
        return tuple(np.concatenate([[left], arc, [right]]) for arc in self.arcs)

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
        """(N + 2K + 1, 3) float32 model-space vertices moved by `motion` (68, 2), cavity included."""
        d = np.zeros((68, 2), np.float32)
        d[:, 0] = motion[:, 0] * self.inter_ocular
        d[:, 1] = -motion[:, 1] * self.inter_ocular  # model y is up
        up = self.weights_up @ d[self.landmarks_up]
        low = self.weights_low @ d[self.landmarks_low]
        moved = self.base.copy()
        moved[:, :2] += (low * self.below[:, None] + up * (1 - self.below[:, None])) * self.fade[:, None]
        self._round_inner_edge(moved)
        loop = moved[self.mouth_loop]
        ring = loop + self.ring_offset
        back = loop.mean(0) + self.back_offset
        return np.concatenate([moved, loop, ring, back[None]]).astype(np.float32)

    def _round_inner_edge(self, moved: np.ndarray) -> None:
        """Reshape each inner lip edge (an arc of the mouth loop, in place in `moved`) to the
        lens a real parted mouth shows: from the chord between the mouth corners, a bulge
        `c * (1 - u^2) ** LENS_POWER` (u: -1 at one corner, 1 at the other) of the same
        least-squares size as the moved edge's. Interpolating a few lip controls alone leaves
        V and chevron shapes that a learned face model reads as a less open mouth."""
        if INNER_EDGE_ROUNDING <= 0:
            return
        (xa, ya), (xb, yb) = moved[self.corners[0], :2], moved[self.corners[1], :2]
        if abs(xb - xa) < 1e-6:
            return
        for arc in self.arcs:
            x, y = moved[arc, 0], moved[arc, 1]
            t = np.clip((x - xa) / (xb - xa), 0.0, 1.0)
            chord = ya + t * (yb - ya)
            shape = (1.0 - (2.0 * t - 1.0) ** 2) ** LENS_POWER
            size = float(shape @ (y - chord)) / max(float(shape @ shape), 1e-9)
            moved[arc, 1] = y + INNER_EDGE_ROUNDING * (chord + size * shape - y)

    def projected_opening(self, vertices: np.ndarray, landmark_vertex: np.ndarray, modelview: np.ndarray,
                          projection: np.ndarray, size: int, pairs=OUTER_LIP_PAIRS) -> float:
        """The lip opening (see `lip_opening`, in inter-ocular distances, roll removed; `pairs`:
        the outer lip's or `INNER_LIP_PAIRS`) of model-space `vertices` as this camera shows
        them; landmark_vertex: (68,) the model's."""
        points = np.zeros((68, 3), np.float32)
        mapped = landmark_vertex >= 0
        points[mapped] = vertices[landmark_vertex[mapped]]
        projected = project_vertices(points, modelview, projection, size)[None, :, :2]
        return float(lip_opening(projected, pairs)[0])

    def uncrossed(self, motion: np.ndarray, landmark_vertex: np.ndarray, modelview: np.ndarray,
                  projection: np.ndarray, size: int) -> np.ndarray:
        """(68, 2) `motion` with the inner lips moved apart, both by as much, until they meet
        where this camera shows them crossed (`projected_opening` of `INNER_LIP_PAIRS` below 0).
        A detector crosses the inner lips of some tightly closed mouths (the lower point above
        the upper one); a rig registered so would first have to uncross them before any of a
        lip reference's opening showed. The rig and the projection are linear: one step is exact."""
        camera = (landmark_vertex, modelview, projection, size)
        crossed = self.projected_opening(self.vertices(motion), *camera, pairs=INNER_LIP_PAIRS)
        if crossed >= 0:
            return motion
        apart = np.zeros((68, 2), np.float32)
        apart[[p for p, _ in INNER_LIP_PAIRS], 1] = -0.025
        apart[[q for _, q in INNER_LIP_PAIRS], 1] = 0.025
        slope = self.projected_opening(self.vertices(motion + apart), *camera, pairs=INNER_LIP_PAIRS) - crossed
        return (motion + apart * (-crossed / slope)).astype(np.float32) if slope > 1e-6 else motion

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
