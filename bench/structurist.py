"""Structurist benchmark (issue 3): 3DMM fit and structure render speed, and lip transfer.

For each cross-person sample pair (identity, lip reference): the product's 512 x 512 face crops
and landmarks (face_crop), the eos fits, the structure frames; then, measured with the
product's own landmark detector (dlib) on the structure frames and on the lip-reference crops:
- Pearson correlation of the lip-distance sequences (outer-lip pairs 50-58, 51-57, 52-56),
- the ratio of their standard deviations, each normalised by the inter-ocular distance,
- PSNR of the face above the nose tip against the identity crop,
- CIE Lab distance between the mean colour of the rendered lips and of the identity's own
  (closed-mouth) lips (`lips_dlab`: lip pixels less a 2 px border, on each image's own
  detected landmarks; and, as "(outline)", on the lip outline the render drew, which a
  detector's misplaced lip points do not move).
Prints ms/frame for fitting and rendering at 512 x 512 (and the bare rasterizer), and, where a
CUDA device and nvdiffrast are present, nvdiffrast's ms/frame and its mean absolute difference
to the CPU renderer's image.

    .venv/bin/python bench/structurist.py [--frames 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freetalk_core import face_crop  # noqa: E402
from freetalk_core.fit_3dmm import fit_frame_vertices, fit_landmarks, load_face_model  # noqa: E402
from freetalk_core.lips import lip_opening  # noqa: E402
from freetalk_core.structure_render import (  # noqa: E402
    ModernGLRenderer,
    StructureFrames,
    lip_band_colour_lab,
    lip_colour_lab,
)
from freetalk_core.video import read_video  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PAIRS = (
    ("MimicTalk__May_5s.mp4", "EDTalk__mouth_source.mp4"),
    ("VideoRetalking__face_2.mp4", "MimicTalk__May_5s.mp4"),
    ("SadTalker__WDA_KatieHill_000.mp4", "LatentSync__demo1_video.mp4"),
    ("DreamTalk__M030_front_neutral_level1_001.mp4", "LipNet__bbaf2n.mpg"),
    ("SadTalker__RD_Radio2_000.mp4", "VideoRetalking__face_2.mp4"),
    ("LatentSync__demo1_video.mp4", "SadTalker__WDA_KatieHill_000.mp4"),
)


def prepare(path: Path, n_frames: int, detector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, 512, 512, 3) uint8 crops, (T, 68, 2) float32 crop landmarks and (T, 68, 2) float32
    per-frame crop landmarks (not smoothed: what the face_crop stage keeps of a lip reference)
    of a clip's start."""
    frames = read_video(path, max_frames=n_frames)
    tracked, found = face_crop.track_landmarks(iter(frames), detector)
    landmarks, _ = face_crop.fill_and_smooth(tracked, found)
    per_frame, _ = face_crop.fill_and_smooth(tracked, found, window=1)
    M = face_crop.crop_transforms(landmarks)
    crops = np.stack([face_crop.warp_to_crop(f, m) for f, m in zip(frames, M)])
    return crops, face_crop.transform_points(landmarks, M[:, None]), face_crop.transform_points(per_frame, M[:, None])


def render_pair(model, clips: dict, fits: dict, identity: str, lip_ref: str, renderer, **options):
    """The structure frames of (identity, lip reference), over the shorter clip, the render's
    ms per frame and its `StructureFrames`. clips: name -> (crops, landmarks, per-frame
    landmarks) of `prepare`; fits: name -> fit."""
    (crops, landmarks, _), (_, _, lip_landmarks) = clips[identity], clips[lip_ref]
    n = min(len(crops), len(lip_landmarks))
    start = time.perf_counter()
    structure = StructureFrames(model, crops[:n], landmarks[:n], _head(fits[identity], n), lip_landmarks[:n],
                                renderer=renderer, **options)
    frames = np.stack([structure.frame(t, crops[t]) for t in range(n)])
    return frames, 1000 * (time.perf_counter() - start) / n, structure


def lips_dlab(identity_crops, identity_landmarks, frames, frame_landmarks, structure) -> tuple[float, float]:
    """CIE Lab distance between the mean colour of the identity's own lips (its 8 most closed
    frames) and of the structure frames' lips: where a landmark detector finds them
    (`frame_landmarks` (T, 68, 2), NaN where it found no face) and where the render put them
    (`StructureFrames.lip_outline`: the lip colour itself, wherever a detector places the lips)."""
    n = len(frames)
    closed = np.argsort(lip_opening(identity_landmarks[:n]))[:8]
    own = np.mean([lip_colour_lab(identity_crops[i], identity_landmarks[i]) for i in closed], axis=0)
    detected = np.mean([lip_colour_lab(f, lm) for f, lm in zip(frames, frame_landmarks) if np.isfinite(lm).all()],
                       axis=0)
    outlined = np.mean([lip_band_colour_lab(frames[t], *structure.lip_outline(t)) for t in range(n)], axis=0)
    return float(np.linalg.norm(own - detected)), float(np.linalg.norm(own - outlined))


def detect_all(detector, images) -> np.ndarray:
    """(T, 68, 2) float32 dlib landmarks of each image, NaN where no face is found."""
    out = [detector.detect(image) for image in images]
    return np.stack([np.full((68, 2), np.nan, np.float32) if lm is None else lm for lm in out])


def upper_face_psnr(image, reference, landmarks) -> float:
    """PSNR (dB) over the face above the nose tip (hull of jaw and brows, rows above point 30)."""
    hull = cv2.convexHull(np.round(landmarks[:27]).astype(np.int32))
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    mask[int(landmarks[30, 1]):] = 0
    mse = ((image.astype(np.float64) - reference.astype(np.float64)) ** 2)[mask > 0].mean()
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--own-frame-texture", type=int, choices=(0, 1), default=0,
                        help="texture each frame with its own colours (1) or the merged texture only (0)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "freetalk-bench-structurist")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_face_model(SHARED / "models" / "eos")
    detector = face_crop.LandmarkDetector()
    renderer = ModernGLRenderer()
    clips = {}
    for name in sorted({n for pair in PAIRS for n in pair}):
        clips[name] = prepare(SHARED / "samples" / name, args.frames, detector)

    fits, fit_ms = {}, []
    for name, (crops, landmarks, _) in clips.items():
        start = time.perf_counter()
        fits[name] = fit_landmarks(model, landmarks)
        fit_ms.append(1000 * (time.perf_counter() - start) / len(landmarks))

    # How far the eos fit alone (6 expression blendshapes) carries the lip opening: the fitted
    # meshes' projected outer-lip vertices against the landmarks they were fitted to.
    print("eos fit alone, lip opening of the projected mesh vs the landmarks:")
    for name, (crops, landmarks, _) in clips.items():
        lv = model.landmark_vertex
        mesh = np.stack([fit_frame_vertices(model, fits[name], t)[np.maximum(lv, 0), :2]
                         for t in range(len(landmarks))])
        a = lip_opening(mesh)
        b = lip_opening(landmarks)
        print(f"  {name:44s} Pearson {np.corrcoef(a, b)[0, 1]:.3f}, std ratio {a.std() / b.std():.2f}")

    rows, render_ms = [], []
    print(f"{'identity':34s} {'lip reference':34s} {'frames':>6s} {'pearson':>8s} {'std ratio':>9s} "
          f"{'upper PSNR':>10s} {'lips dLab':>9s} {'(outline)':>9s}")
    for identity, lip_ref in PAIRS:
        frames, ms, structure = render_pair(model, clips, fits, identity, lip_ref, renderer,
                                            own_frame_texture=bool(args.own_frame_texture))
        render_ms.append(ms)
        (crops, landmarks, _), (lip_crops, _, _), n = clips[identity], clips[lip_ref], len(frames)
        rendered = detect_all(detector, frames)
        reference = detect_all(detector, lip_crops[:n])
        a = lip_opening(rendered)
        b = lip_opening(reference)
        ok = np.isfinite(a) & np.isfinite(b)
        pearson = float(np.corrcoef(a[ok], b[ok])[0, 1])
        ratio = float(a[ok].std() / b[ok].std())
        psnr = float(np.mean([upper_face_psnr(f, c, l) for f, c, l in zip(frames, crops, landmarks)]))
        dlab, outline_dlab = lips_dlab(crops, landmarks, frames, rendered, structure)
        rows.append(dict(identity=identity, lip_ref=lip_ref, frames=n, undetected=int((~ok).sum()),
                         pearson=pearson, std_ratio=ratio, upper_psnr_db=psnr, lips_dlab=dlab,
                         lips_dlab_outline=outline_dlab))
        print(f"{identity:34s} {lip_ref:34s} {n:6d} {pearson:8.3f} {ratio:9.2f} {psnr:10.1f} {dlab:9.1f} "
              f"{outline_dlab:9.1f}", flush=True)
        sheet = np.concatenate([np.concatenate([crops[i], lip_crops[i], frames[i]], axis=1)
                                for i in np.argsort(b)[[0, n // 2, -1]]], axis=0)[::2, ::2]
        cv2.imwrite(str(args.out / f"{Path(identity).stem}__{Path(lip_ref).stem}.png"),
                    cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    pearsons = [r["pearson"] for r in rows]
    print(f"mean Pearson {np.mean(pearsons):.3f} (min {np.min(pearsons):.3f}); std ratio "
          f"{min(r['std_ratio'] for r in rows):.2f}-{max(r['std_ratio'] for r in rows):.2f}; upper PSNR "
          f">= {min(r['upper_psnr_db'] for r in rows):.1f} dB; lips dLab <= {max(r['lips_dlab'] for r in rows):.1f} "
          f"(on the rendered lip outline <= {max(r['lips_dlab_outline'] for r in rows):.1f})")

    # The bare rasterizer: one textured-mesh-sized draw and read-back at 512 x 512.
    crops, landmarks, _ = clips[PAIRS[0][0]]
    projected = fit_frame_vertices(model, fits[PAIRS[0][0]], 0)
    attributes = np.concatenate([model.uv, np.zeros((len(model.uv), 1), np.float32)], axis=1)
    raster_ms = _time(lambda: renderer.rasterize(projected, model.triangles, attributes, 512))
    print(f"fit: {np.mean(fit_ms):.1f} ms/frame; structure render (texture, rig, raster, blend): "
          f"{np.mean(render_ms):.1f} ms/frame; moderngl rasterize 512x512: {raster_ms:.2f} ms")
    gpu = _nvdiffrast(projected, model.triangles, attributes, renderer)
    if gpu:
        print(f"nvdiffrast rasterize 512x512: {gpu['ms']:.2f} ms; mean |CPU - GPU| {gpu['mad']:.4f} "
              f"(attribute units), coverage agreement {gpu['coverage_agree']:.4f}")
    (args.out / "results.json").write_text(json.dumps(
        dict(pairs=rows, fit_ms=float(np.mean(fit_ms)), render_ms=float(np.mean(render_ms)),
             raster_ms=raster_ms, nvdiffrast=gpu), indent=2))
    print(f"contact sheets and results.json in {args.out}")


def _head(fit, n):
    from dataclasses import replace

    return replace(fit, **{k: v[:n] for k, v in fit.__dict__.items() if isinstance(v, np.ndarray)})


def _time(call, repeats: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return 1000 * (time.perf_counter() - start) / repeats


def _nvdiffrast(positions, triangles, attributes, cpu_renderer) -> dict | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from freetalk_core.structure_render import NvdiffrastRenderer

        gpu_renderer = NvdiffrastRenderer()
    except ImportError as error:
        print(f"nvdiffrast not measured: {error}")
        return None
    cpu, cpu_cov = cpu_renderer.rasterize(positions, triangles, attributes, 512)
    gpu, gpu_cov = gpu_renderer.rasterize(positions, triangles, attributes, 512)
    both = cpu_cov & gpu_cov
    return dict(ms=_time(lambda: gpu_renderer.rasterize(positions, triangles, attributes, 512)),
                mad=float(np.abs(cpu - gpu)[both].mean()), coverage_agree=float((cpu_cov == gpu_cov).mean()))


if __name__ == "__main__":
    main()
