"""Evaluation of one finished item (`freetalk evaluate`): its metrics, measured on the output
video and on what the store keeps, written to the metrics table, and its report figures.

Generated frames are the output video's frames cropped where the identity's were (what a user
gets: pasted back, encoded, watermarked). One landmark detector (dlib) reads the output, the
structure frames and the lip-reference crops alike. Protocols (METHOD.md, Evaluation):

- `self` (self-reconstruction): identity = lip reference = ground truth. Lip metrics against
  the clip's own lips, FID / LPIPS / FVD against its own frames.
- `cross` (cross-driving, identity A, lip reference B): lip metrics against B's lips, CSIM,
  FID and FVD against A's frames; LPIPS needs a ground truth and is not computed.
- `auto`: `self` where the item's identity and lip reference are the same file (by sha256).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from prefect import task

from freetalk_core import CROP_SIZE, flow, noise_sensor
from freetalk_core.errors import FreetalkError, ModelFileError, one_line
from freetalk_core.evaluation.metrics import csim, lip_sync_metrics
from freetalk_core.face_crop import LandmarkDetector
from freetalk_core.lips import lip_opening
from storage import Store, arrays
from tasks.common import chunk_ranges, flow_values, load_cached, mask_weights, read_flows
from tasks.frames import Crops, StoredStructureFrames

STAGE = arrays.EVALUATION
"""The item's Zarr group for what evaluation keeps: flow fields of the filtered crops and the
network features that pooled (whole-dataset) FID and FVD are computed from."""
PROTOCOLS = ("auto", "self", "cross")
BLOCK = 25
"""Frames decoded and measured at once."""
STRIP_FRAMES = 5
"""Frames shown in the report's frame strip."""


class EvaluationError(FreetalkError):
    """An item that cannot be evaluated (not done, output missing, protocol does not apply)."""


def item_protocol(row: dict, asked: str) -> str:
    """The protocol an item is evaluated under (`asked`: one of PROTOCOLS)."""
    if asked not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {asked!r}")
    same = bool(row.get("identity_sha256")) and row.get("identity_sha256") == row.get("lip_ref_sha256")
    if asked == "auto":
        return "self" if same else "cross"
    if asked == "self" and not same:
        raise EvaluationError("protocol self needs one clip as identity and lip reference; this item "
                              "pairs two (use --protocol cross or auto)")
    return asked


def _output_video(store: Store, item_id: str, row: dict) -> Path:
    if row.get("status") != "done":
        raise EvaluationError(f"item {item_id} is {row.get('status')}, not done: run generate or dataset first")
    path = Path(row.get("output") or store.output_path(item_id))
    if not path.is_file():
        raise EvaluationError(f"item {item_id}: its output {path} is missing (run it again with --retry-failed "
                              "or generate)")
    return path


class _Networks:
    """The learned-network metrics of one item, fed a block of frames at a time; a network
    whose weights are absent is noted once (one line naming the file) and skipped."""

    def __init__(self, models_dir: Path, protocol: str, notes: list[str]):
        from freetalk_core.evaluation import networks

        self.networks, self.models, self.protocol, self.notes = networks, models_dir, protocol, notes
        self.off: set[str] = set()
        self.inception = {"generated": [], "reference": []}
        self.i3d = {"generated": [], "reference": []}
        self.clips = {"generated": [], "reference": []}
        self.lpips: list[tuple[float, int]] = []  # (mean over a block, its frames)

    def _try(self, metric: str, compute):
        if metric in self.off:
            return None
        try:
            return compute()
        except ModelFileError as exc:
            self.off.add(metric)
            self.notes.append(f"{metric}: {one_line(exc)}")
            return None

    def add(self, generated: np.ndarray, reference: np.ndarray) -> None:
        for name, frames in (("generated", generated), ("reference", reference)):
            feats = self._try("FID", lambda: self.networks.inception_features(frames, self.models))
            if feats is not None:
                self.inception[name].append(feats)
            self.clips[name].extend(frames)
            while len(self.clips[name]) >= self.networks.FVD_CLIP_LEN:
                clip = np.stack(self.clips[name][:self.networks.FVD_CLIP_LEN])
                del self.clips[name][:self.networks.FVD_CLIP_LEN]
                feats = self._try("FVD", lambda: self.networks.i3d_features([clip], self.models))
                if feats is not None:
                    self.i3d[name].append(feats)
        if self.protocol == "self":
            mean = self._try("LPIPS", lambda: self.networks.lpips(generated, reference, self.models))
            if mean is not None:
                self.lpips.append((float(mean), len(generated)))

    def features(self) -> dict[str, np.ndarray]:
        """The stacked features, `inception_<side>` and `i3d_<side>`, of what was measured."""
        out = {}
        for kind, store in (("inception", self.inception), ("i3d", self.i3d)):
            for side, feats in store.items():
                if feats:
                    out[f"{kind}_{side}"] = np.concatenate(feats).astype(np.float32)
        return out

    def metrics(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        out = {}
        for metric, kind in (("FID", "inception"), ("FVD", "i3d")):
            a, b = features.get(f"{kind}_generated"), features.get(f"{kind}_reference")
            if a is not None and b is not None and len(a) >= 2 and len(b) >= 2:
                out[metric] = self.networks.frechet_distance(a, b)
            elif metric not in self.off:
                need = "2 frames" if kind == "inception" else f"2 clips of {self.networks.FVD_CLIP_LEN} frames"
                self.notes.append(f"{metric}: needs at least {need}")
        if self.lpips:
            out["LPIPS"] = sum(m * k for m, k in self.lpips) / sum(k for _, k in self.lpips)
        return out


def _arcface(models_dir: Path, notes: list[str]):
    from freetalk_core.clip_embed import load_arcface

    try:
        return load_cached("arcface", lambda: load_arcface(models_dir), models=models_dir,
                           components=("insightface",))
    except ModelFileError as exc:
        notes.append(f"CSIM: {one_line(exc)}")
        return None


def _lse(store: Store, item_id: str, output: Path, faces: list[np.ndarray], fps: float,
         models_dir: Path, notes: list[str]) -> dict[str, float]:
    from freetalk_core import video
    from freetalk_core.evaluation import syncnet

    if not video.has_audio(output):
        notes.append("LSE-C/LSE-D: the output has no audio")
        return {}
    try:
        audio = video.read_audio(output, syncnet.SYNCNET_RATE)
        found = syncnet.lse(np.stack(faces), fps, audio, syncnet.SYNCNET_RATE, models_dir)
    except ModelFileError as exc:
        notes.append(f"LSE-C/LSE-D: {one_line(exc)}")
        return {}
    except ValueError as exc:  # too short for SyncNet's windows
        notes.append(f"LSE-C/LSE-D: {one_line(exc)}")
        return {}
    return {"LSE_C": float(found["LSE_C"]), "LSE_D": float(found["LSE_D"]), "LSE_offset": float(found["offset"])}


def _mnp_after(store: Store, item_id: str, notes: list[str]) -> tuple[float, np.ndarray | None]:
    """MNP of the filtered crops (the mouth-mask part of the noise filter's frames over the
    diffusion frames around it), measured as the noise filter measured the diffusion frames'
    MNP: flow fields in the mouth box against the same reference flow fields, the same
    statistics window and mask. Returns it with the noise pattern `(512, 512)`."""
    needed = (arrays.GENERATED_FRAMES, arrays.REFERENCE_FLOW, arrays.FILTERED_FRAMES)
    if not all(store.has_array(item_id, spec) for spec in needed):
        notes.append("MNP_after: the item's intermediate arrays were not kept (--keep final): "
                     "run it again with --keep all to measure the filter")
        return math.nan, None
    x0, y0, x1, y1 = store.attrs(item_id, arrays.OPTICAL_FLOW)["box"]
    diffused = store.array(item_id, arrays.GENERATED_FRAMES)
    filtered = store.array(item_id, arrays.FILTERED_FRAMES)
    masks = store.array(item_id, arrays.MOUTH_MASKS)
    reference = store.array(item_id, arrays.REFERENCE_FLOW)
    n = diffused.shape[0]
    if n < 3:
        notes.append("MNP_after: needs at least 3 frames")
        return math.nan, None
    flows = store.open_array(item_id, arrays.FILTERED_FLOW, reference.shape, BLOCK)
    for start, stop in chunk_ranges(n - 1, BLOCK):
        box = (slice(start, stop + 1), slice(y0, y1), slice(x0, x1))
        inside = masks[box] > 0
        frames = np.where(inside[..., None], filtered[box], diffused[box])
        flows[start:stop] = flow_values(flow.optical_flow(frames))

    def read(start, stop):
        return read_flows(flows, start, stop), read_flows(reference, start, stop)

    window = int(store.attrs(item_id, arrays.NOISE_FILTER).get("statistics_window") or n - 1)
    pattern = np.zeros((CROP_SIZE, CROP_SIZE), np.float32)
    pattern[y0:y1, x0:x1] = noise_sensor.clip_noise_pattern(read, n - 1, min(window, n - 1), block=BLOCK)
    weights = np.zeros((CROP_SIZE, CROP_SIZE), np.float64)
    for start in range(0, n, 64):
        weights += mask_weights(masks[start:start + 64]).sum(axis=0)
    return noise_sensor.mean_noise_pattern(pattern, (weights / n).astype(np.float32)), pattern


def _strip_picks(n: int) -> set[int]:
    return set(np.linspace(0, n - 1, min(n, STRIP_FRAMES)).round().astype(int).tolist())


@task(name="evaluate_item", retries=0)
def evaluate_item(store_dir: str, item_id: str, protocol: str = "auto", models: str | None = None,
                  figures: str | None = None) -> dict:
    """Every metric of one done item, recorded in the store's metrics table; with `figures`, a
    folder, the item's report figures written there. Returns `{"item_id", "protocol",
    "metrics", "notes", "figures", "models"}` (notes: one line per metric not computed, why)."""
    from freetalk_core.cpbd import cpbd
    from freetalk_core.models import resolve_models_dir

    store = Store(store_dir)
    row = store.item(item_id) or {}
    if not row:
        raise EvaluationError(f"the store has no item {item_id}")
    output = _output_video(store, item_id, row)
    protocol = item_protocol(row, protocol)
    filter_attrs = (store.attrs(item_id, arrays.NOISE_FILTER) if store.has_stage_group(item_id, arrays.NOISE_FILTER)
                    else {})
    models_dir = resolve_models_dir(models or filter_attrs.get("models"))
    fps = float(store.attrs(item_id, arrays.FACE_CROP)["fps"])
    notes: list[str] = []

    generated = Crops(store, item_id, "output", str(output))
    lip_ref = Crops(store, item_id, "lip_ref")
    identity = Crops(store, item_id, "identity")
    has_structure = store.has_stage_group(item_id, arrays.STRUCTURE_RENDER)
    structure = StoredStructureFrames(store, item_id) if has_structure else None
    if not has_structure:
        notes.append("structure_PD/CSLD/PCLD: the structure frames were not kept (--keep final)")
    n = len(generated)
    ranges = chunk_ranges(n, BLOCK)
    readers = {"generated": generated.reader(ranges), "lip_ref": lip_ref.reader(ranges),
               "identity": identity.reader(ranges)}
    if structure is not None:
        readers["structure"] = structure.reader(ranges)
    identity_landmarks = store.read(item_id, arrays.LANDMARKS["identity"])
    passthrough = store.read(item_id, arrays.IDENTITY_PASSTHROUGH)

    detector = load_cached("landmark detector", LandmarkDetector)
    arcface = _arcface(models_dir, notes)
    nets = _Networks(models_dir, protocol, notes)
    landmarks = {name: [] for name in readers if name != "identity"}
    sharpness, embeddings, faces, strip = [], {"generated": [], "identity": []}, [], []
    picks = _strip_picks(n)
    box = store.attrs(item_id, arrays.FACE_CROP)["box"]
    diffused = (store.array(item_id, arrays.GENERATED_FRAMES) if store.has_array(item_id, arrays.GENERATED_FRAMES)
                else None)
    for start, stop in ranges:
        frames = {name: read(start, stop) for name, read in readers.items()}
        # Frames passed through untouched (no face there) are no generated mouth: left out.
        keep = ~passthrough[start:stop]
        for name in landmarks:
            found = detector.detect_all(frames[name])
            found[~keep] = np.nan
            landmarks[name].append(found)
        out = frames["generated"]
        sharpness += [cpbd(image) for image in out[keep]]
        if arcface is not None:
            from freetalk_core.clip_embed import face_embeddings

            embeddings["generated"].append(face_embeddings(arcface, out, landmarks["generated"][-1]))
            embeddings["identity"].append(face_embeddings(arcface, frames["identity"],
                                                          identity_landmarks[start:stop]))
        ground_truth = frames["identity"]
        if keep.any():
            nets.add(out[keep], ground_truth[keep])
        faces += [_face_window(image) for image in out]
        for t in sorted(picks & set(range(start, stop))):
            i = t - start
            strip.append([frames["identity"][i], frames["lip_ref"][i],
                          frames["structure"][i] if "structure" in frames else np.zeros_like(out[i]),
                          _in_box(frames["identity"][i], diffused[t], box) if diffused is not None
                          else np.zeros_like(out[i]), out[i]])

    marks = {name: np.concatenate(blocks) for name, blocks in landmarks.items()}
    result = {}
    found = lip_sync_metrics(marks["generated"], marks["lip_ref"])
    result.update({k: found[k] for k in ("PD", "CSLD", "PCLD")})
    result["lip_frames"] = found["lip_frames"]
    if "structure" in marks:
        found = lip_sync_metrics(marks["structure"], marks["lip_ref"])
        result.update({f"structure_{k}": found[k] for k in ("PD", "CSLD", "PCLD")})
    if sharpness:
        result["CPBD"] = float(np.mean(sharpness))
    if arcface is not None:
        result["CSIM"] = csim(np.concatenate(embeddings["generated"]), np.concatenate(embeddings["identity"]))
    features = nets.features()
    for spec in arrays.FEATURES.values():
        if spec.name in features:
            store.write_array(item_id, spec, features[spec.name])
    result.update(nets.metrics(features))
    result.update(_lse(store, item_id, output, faces, fps, models_dir, notes))
    if "mnp" in filter_attrs:
        result["MNP_before"] = float(filter_attrs["mnp"])
    result["MNP_after"], pattern_after = _mnp_after(store, item_id, notes)
    result = {k: float(v) for k, v in result.items() if v is not None and math.isfinite(float(v))}
    store.record_metrics(item_id, result)
    store.set_attrs(item_id, STAGE, protocol=protocol, notes=notes, models=str(models_dir))

    written = {}
    if figures is not None:
        from freetalk_core.evaluation import report

        folder = Path(figures)
        folder.mkdir(parents=True, exist_ok=True)
        curves = {"lip reference": lip_opening(marks["lip_ref"]), "output": lip_opening(marks["generated"])}
        if "structure" in marks:
            curves["structure frames"] = lip_opening(marks["structure"])
        written["lip_curves"] = str(report.lip_curve_plot(curves, folder / "lip_opening.png",
                                                          title=f"{item_id}: lip opening ({protocol})"))
        before = (store.read(item_id, arrays.NOISE_PATTERN)
                  if filter_attrs and store.has_array(item_id, arrays.NOISE_PATTERN) else None)
        if before is not None or pattern_after is not None:
            written["noise_patterns"] = str(report.noise_pattern_figure(before, pattern_after,
                                                                        folder / "noise_patterns.png"))
        written["frame_strip"] = str(report.frame_strip(strip, folder / "frame_strip.png"))
    return {"item_id": item_id, "protocol": protocol, "metrics": result, "notes": notes,
            "figures": written, "models": str(models_dir)}


def _in_box(background: np.ndarray, frame: np.ndarray, box) -> np.ndarray:
    """`frame` inside the mouth `box`, `background` around it (diffusion frames are stored in
    the box only)."""
    x0, y0, x1, y1 = box
    out = background.copy()
    out[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    return out


def _face_window(image: np.ndarray) -> np.ndarray:
    """The crop as SyncNet reads faces: 224 x 224."""
    import cv2

    from freetalk_core.evaluation.syncnet import SYNCNET_SIDE

    return cv2.resize(image, (SYNCNET_SIDE, SYNCNET_SIDE), interpolation=cv2.INTER_AREA)
