"""Lip transfer of the structure frames as two observers read it, over every ordered pair of
different people in the sample clips (structure frames only, no diffusion).

For each clip (the first `--frames` frames, 3 s at 25 fps by default): the product's 512 x 512
face crops and landmarks (bench/structurist.py's `prepare`, as the face_crop stage makes them)
and its eos fit. For each ordered pair (identity, lip reference) of different clips: the
structure frames (`render_structure_frames`, as the structure_render stage makes them), then
two observers read the lip opening of the structure frames and of the lip-reference crops:

- dlib: the product's own landmark detector, its shape predictor as it is (without the
  resampling and mirroring the product's tracking adds: the observer stays the same whatever
  the tracking does), each frame read on its own (outer-lip pairs 50-58, 51-57, 52-56; inner
  61-67, 62-66, 63-65);
- MediaPipe: its face mesh (a learned landmark model, weights in the wheel), each frame read
  on its own (outer lips 37-84, 0-17, 267-314; inner 82-87, 13-14, 312-317).

Both openings are in units of the inter-ocular distance. Per pair and observer: the Pearson
correlation of the outer-lip distance sequences, the ratio of their standard deviations
(structure / lip reference) for the outer and the inner lip opening; per pair the upper-face
PSNR and the lip colour distance (`upper_face_psnr`, `lips_dlab`, as bench/structurist.py: on
dlib's lip points and on the lip outline the render drew);
overall the mean, minimum and std-ratio range, and the worst five pairs of each observer with
a plot (`worst_*.png`: both openings over time for both observers, and three frames).

Where the MediaPipe figure is lost, two more Pearson correlations per pair tell apart: against
the drive, the outer-lip opening of the product's tracked lip-reference landmarks that moves
the mouth rig, `mp_drive_pearson` is MediaPipe on the structure frames (what the rendering
loses) and `mp_ceiling` MediaPipe on the real lip-reference frames (how far the product's
reading of the lip reference agrees with the other observer's: structure frames that
followed their drive exactly would agree with MediaPipe on the lip reference as well as the
drive does, and no better unless they add what the drive misses). `--static-identity`
renders every pair with the identity's most-closed frame held still (its crop, landmarks and
fit), which shows how much of what is lost comes from the identity's own motion.

The two observers also scale the inner-lip opening of the same real frames differently, by a
factor that depends on the clip (`mp_inner_scale`, MediaPipe's std over dlib's). Structure
frames moved by the product's reading cannot undo that factor, so some pairs' MediaPipe inner
std ratio must fall outside [0.75, 1.33] whatever the rendering: `mp_inner_outside_floor`
counts the fewest (`inner_scale_floor`).

With `--models DIR` (a models folder with `image_encoder/`, e.g. `freetalk models tiny DIR`,
or the real ViT-H), each pair also gets the Pearson correlation between the structure
embedding's distance from the anchor frame and the lip opening (`embedding_follows_lips`).

MediaPipe 0.10 pins numpy < 2, which the product does not: it runs in its own environment,
created on first use as

    python3 -m venv /work/mp-venv && /work/mp-venv/bin/pip install mediapipe==0.10.21

(`--mp-venv` to put it elsewhere), through bench/mediapipe_landmarks.py in a subprocess that
reads frames from a .npy file and writes the landmarks to another.

    .venv/bin/python bench/structure_observers.py [--frames 75] [--out DIR] [--models DIR]
        [--identities A B ...] [--lip-refs C D ...] [--static-identity]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.structurist import SHARED, detect_all, lips_dlab, prepare, render_pair, upper_face_psnr  # noqa: E402
from freetalk_core import face_crop  # noqa: E402
from freetalk_core.fit_3dmm import fit_landmarks, load_face_model  # noqa: E402
from freetalk_core.lips import INNER_LIP_PAIRS, closed_mouth_index, lip_opening  # noqa: E402
from freetalk_core.structure_render import ModernGLRenderer  # noqa: E402

MEDIAPIPE = "mediapipe==0.10.21"
MP_WORKER = Path(__file__).resolve().parent / "mediapipe_landmarks.py"
MP_OUTER = ((37, 84), (0, 17), (267, 314))
MP_INNER = ((82, 87), (13, 14), (312, 317))
MP_EYES = ((33, 133), (362, 263))
VIDEO_SUFFIXES = (".mp4", ".mpg", ".mov", ".avi", ".mkv")


# ---------------------------------------------------------------------------------------------
# Observers
# ---------------------------------------------------------------------------------------------


class MediaPipeObserver:
    """MediaPipe's face mesh in its own environment: `landmarks(frames)` (N, 468, 2) px."""

    def __init__(self, venv: Path, scratch: Path):
        python = venv / "bin" / "python"
        if not python.is_file():
            print(f"creating {venv} with {MEDIAPIPE} (once)", flush=True)
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", MEDIAPIPE], check=True)
        self.scratch = scratch
        self.process = subprocess.Popen([str(python), str(MP_WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def landmarks(self, frames: np.ndarray) -> np.ndarray:
        source, target = self.scratch / "frames.npy", self.scratch / "landmarks.npy"
        np.save(source, np.ascontiguousarray(frames))
        self.process.stdin.write(f"{source} {target}\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ok":
            raise RuntimeError("the MediaPipe worker stopped")
        return np.load(target)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def mp_opening(landmarks: np.ndarray, pairs) -> np.ndarray:
    """(T,) float64 mean vertical distance of MediaPipe lip point `pairs` (upper, lower), in
    inter-ocular distances with the roll removed. landmarks: (T, 468, 2) px (NaN rows stay NaN)."""
    landmarks = np.asarray(landmarks, np.float64)
    eyes = [landmarks[:, list(pair)].mean(axis=1) for pair in MP_EYES]
    axis = eyes[1] - eyes[0]
    distance = np.linalg.norm(axis, axis=1)
    normal = np.stack([-axis[:, 1], axis[:, 0]], axis=1) / distance[:, None]  # image "down"
    upper = landmarks[:, [p for p, _ in pairs]]
    lower = landmarks[:, [q for _, q in pairs]]
    along = ((lower - upper) * normal[:, None]).sum(-1).mean(axis=1)
    return along / distance


def observe(detector, mediapipe: MediaPipeObserver, frames: np.ndarray) -> dict[str, np.ndarray]:
    """The lip openings both observers read in `frames` (T, S, S, 3) uint8 (NaN: no face)."""
    dlib_landmarks = detect_all(detector, frames)
    mp_landmarks = mediapipe.landmarks(frames)
    return {"dlib_outer": lip_opening(dlib_landmarks), "dlib_inner": lip_opening(dlib_landmarks, INNER_LIP_PAIRS),
            "mp_outer": mp_opening(mp_landmarks, MP_OUTER), "mp_inner": mp_opening(mp_landmarks, MP_INNER),
            "dlib_landmarks": dlib_landmarks}


def held_still(crops: np.ndarray, landmarks: np.ndarray, fit) -> tuple:
    """(crops, landmarks, fit) of a clip with its most closed-mouth frame in every frame."""
    from dataclasses import replace

    T, k = len(crops), closed_mouth_index(landmarks)
    return (np.repeat(crops[k:k + 1], T, axis=0), np.repeat(landmarks[k:k + 1], T, axis=0),
            replace(fit, **{f: np.repeat(v[k:k + 1], T, axis=0) for f, v in fit.__dict__.items()
                            if isinstance(v, np.ndarray) and len(v) == T}))


def agreement(rendered: np.ndarray, reference: np.ndarray) -> tuple[float, float, int]:
    """(Pearson, std ratio rendered / reference, frames missed by the observer)."""
    ok = np.isfinite(rendered) & np.isfinite(reference)
    if ok.sum() < 3 or reference[ok].std() == 0 or rendered[ok].std() == 0:
        return float("nan"), float("nan"), int((~ok).sum())
    return (float(np.corrcoef(rendered[ok], reference[ok])[0, 1]), float(rendered[ok].std() / reference[ok].std()),
            int((~ok).sum()))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def plot_pair(path: Path, row: dict, series: dict, sheet: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(12, 8))
    for k, (observer, label) in enumerate((("dlib", "dlib"), ("mp", "MediaPipe"))):
        axes = figure.add_subplot(3, 2, k + 1)
        for part, style in (("outer", "-"), ("inner", ":")):
            axes.plot(series[f"reference_{observer}_{part}"], "k" + style, label=f"lip reference {part}")
            axes.plot(series[f"structure_{observer}_{part}"], "r" + style, label=f"structure {part}")
        axes.set_title(f"{label}: r {row[observer + '_pearson']:.3f}, std ratio outer "
                       f"{row[observer + '_std_ratio']:.2f}, inner {row[observer + '_inner_std_ratio']:.2f}")
        axes.set_xlabel("frame")
        axes.set_ylabel("opening / inter-ocular")
        axes.legend(fontsize=7)
    axes = figure.add_subplot(3, 1, (2, 3))
    axes.imshow(sheet)
    axes.set_axis_off()
    axes.set_title("identity | lip reference | structure frame (most closed, middle, most open)")
    figure.suptitle(f"{row['identity']}  <-  {row['lip_ref']}")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


INNER_RATIO_RANGE = (0.75, 1.33)
"""The goal for the inner-lip std ratio (structure / lip reference) of every pair."""


def inner_scale_floor(seen: dict, pairs: list[tuple]) -> tuple[dict, int]:
    """How differently the two observers scale the same real frames' inner-lip opening, and the
    fewest pairs that this puts outside `INNER_RATIO_RANGE`.

    scale[b] = std(MediaPipe inner) / std(dlib inner) on clip b's own frames. Structure frames
    moved by the product's reading of lip reference b, which MediaPipe reads as k_a times that
    reading (k_a: how identity a's rendered mouth is read), have a MediaPipe inner std ratio
    of about k_a / scale[b]. Whatever k_a, the lip references of one identity whose scales
    span more than the range's width (1.33 / 0.75) cannot all be inside it. Returns (scale per
    clip, the fewest pairs outside the range summed over identities at their best k_a)."""
    scale = {}
    for name, values in seen.items():
        ok = np.isfinite(values["mp_inner"]) & np.isfinite(values["dlib_inner"])
        scale[name] = float(values["mp_inner"][ok].std() / values["dlib_inner"][ok].std())
    low, high = INNER_RATIO_RANGE
    outside = 0
    for identity in {a for a, _ in pairs}:
        q = np.sort([scale[b] for a, b in pairs if a == identity])
        inside = max(int(np.sum((q >= v) & (q <= v * high / low))) for v in q)
        outside += len(q) - inside
    return scale, outside


def summary(rows: list[dict], observer: str) -> dict:
    pearson = np.array([r[f"{observer}_pearson"] for r in rows])
    inner = np.array([r[f"{observer}_inner_std_ratio"] for r in rows])
    outer = np.array([r[f"{observer}_std_ratio"] for r in rows])
    order = np.argsort(np.nan_to_num(pearson, nan=-2.0))
    return dict(mean=float(np.nanmean(pearson)), min=float(np.nanmin(pearson)), failed=int(np.isnan(pearson).sum()),
                std_ratio=[float(np.nanmin(outer)), float(np.nanmax(outer))],
                inner_std_ratio=[float(np.nanmin(inner)), float(np.nanmax(inner))],
                inner_outside=int(np.sum((inner < INNER_RATIO_RANGE[0]) | (inner > INNER_RATIO_RANGE[1]))),
                worst=[(rows[i]["identity"], rows[i]["lip_ref"], float(pearson[i])) for i in order[:5]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=75, help="frames of each clip (75: 3 s at 25 fps)")
    parser.add_argument("--samples", type=Path, default=SHARED / "samples")
    parser.add_argument("--identities", nargs="*", help="only these clips as identity (file names)")
    parser.add_argument("--lip-refs", nargs="*", help="only these clips as lip reference (file names)")
    parser.add_argument("--models", type=Path, help="models folder with image_encoder/: embedding check")
    parser.add_argument("--mp-venv", type=Path, default=Path("/work/mp-venv"))
    parser.add_argument("--static-identity", action="store_true",
                        help="hold each identity still at its most closed-mouth frame (crop, landmarks, fit)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "freetalk-bench-observers")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    names = sorted(p.name for p in args.samples.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    model = load_face_model(SHARED / "models" / "eos")
    detector = face_crop.LandmarkDetector()
    plain_dlib = face_crop.LandmarkDetector(predict_size=0.0, mirror=False)
    renderer = ModernGLRenderer()
    mediapipe = MediaPipeObserver(args.mp_venv, args.out)
    encoder = None
    if args.models:
        from freetalk_core.clip_embed import load_image_encoder

        encoder = load_image_encoder(args.models)

    identities = args.identities or names
    lip_refs = args.lip_refs or names
    pairs = [(a, b) for a in identities for b in lip_refs if a != b]
    clips, fits, seen, fit_ms = {}, {}, {}, []
    for name in sorted(set(identities) | set(lip_refs)):
        clips[name] = prepare(args.samples / name, args.frames, detector)
        start = time.perf_counter()
        fits[name] = fit_landmarks(model, clips[name][1])
        fit_ms.append(1000 * (time.perf_counter() - start) / len(clips[name][1]))
        seen[name] = observe(plain_dlib, mediapipe, clips[name][0])
        seen[name]["drive"] = lip_opening(clips[name][2])
    if args.static_identity:
        held = {name: held_still(*clips[name][:2], fits[name]) for name in identities}
        clips.update({("held", name): (*value[:2], value[1]) for name, value in held.items()})
        fits.update({("held", name): value[2] for name, value in held.items()})

    rows, series, sheets, render_ms = [], {}, {}, []
    print(f"{len(pairs)} pairs, {args.frames} frames each")
    print(f"{'identity':44s} {'lip reference':44s} {'dlib r':>6s} {'ratio':>5s} {'inner':>5s} "
          f"{'MP r':>6s} {'ratio':>5s} {'inner':>5s} {'~drive':>6s} {'ceil':>5s} {'PSNR':>5s} {'dLab':>5s} {'(out)':>5s}"
          + ("  emb r" if encoder else ""))
    for identity, lip_ref in pairs:
        shown_identity = ("held", identity) if args.static_identity else identity
        frames, ms, structure = render_pair(model, clips, fits, shown_identity, lip_ref, renderer)
        render_ms.append(ms)
        (crops, landmarks, _), (lip_crops, _, lip_landmarks) = clips[shown_identity], clips[lip_ref]
        n = len(frames)
        shown, reference = observe(plain_dlib, mediapipe, frames), {k: v[:n] for k, v in seen[lip_ref].items()}
        row = dict(identity=identity, lip_ref=lip_ref, frames=n)
        for observer in ("dlib", "mp"):
            r, ratio, missed = agreement(shown[f"{observer}_outer"], reference[f"{observer}_outer"])
            _, inner_ratio, _ = agreement(shown[f"{observer}_inner"], reference[f"{observer}_inner"])
            row.update({f"{observer}_pearson": r, f"{observer}_std_ratio": ratio,
                        f"{observer}_inner_std_ratio": inner_ratio, f"{observer}_missed": missed})
        row["mp_drive_pearson"], _, _ = agreement(shown["mp_outer"], reference["drive"])
        row["mp_ceiling"], _, _ = agreement(reference["mp_outer"], reference["drive"])
        row["upper_psnr_db"] = float(np.mean([upper_face_psnr(f, c, lm) for f, c, lm in
                                              zip(frames, crops, landmarks)]))
        row["lips_dlab"], row["lips_dlab_outline"] = lips_dlab(crops, landmarks, frames, shown["dlib_landmarks"],
                                                               structure)
        if encoder is not None:
            from freetalk_core.clip_embed import embedding_follows_lips, structure_embeddings

            row["embedding_pearson"] = embedding_follows_lips(structure_embeddings(encoder, frames),
                                                              lip_landmarks[:n])
        rows.append(row)
        key = (identity, lip_ref)
        series[key] = {f"{side}_{part}": values[part] for side, values in (("structure", shown), ("reference", reference))
                       for part in ("dlib_outer", "dlib_inner", "mp_outer", "mp_inner")}
        order = np.argsort(np.nan_to_num(reference["dlib_outer"], nan=0.0))
        sheets[key] = np.concatenate([np.concatenate([crops[i], lip_crops[i], frames[i]], axis=1)
                                      for i in order[[0, n // 2, -1]]], axis=0)[::2, ::2]
        print(f"{identity:44s} {lip_ref:44s} {row['dlib_pearson']:6.3f} {row['dlib_std_ratio']:5.2f} "
              f"{row['dlib_inner_std_ratio']:5.2f} {row['mp_pearson']:6.3f} {row['mp_std_ratio']:5.2f} "
              f"{row['mp_inner_std_ratio']:5.2f} {row['mp_drive_pearson']:6.3f} {row['mp_ceiling']:5.3f} "
              f"{row['upper_psnr_db']:5.1f} {row['lips_dlab']:5.1f} {row['lips_dlab_outline']:5.1f}"
              + (f"  {row['embedding_pearson']:5.3f}" if encoder else ""), flush=True)
    mediapipe.close()

    scale, floor = inner_scale_floor(seen, pairs)
    result = dict(frames=args.frames, pairs=rows, fit_ms=float(np.mean(fit_ms)), render_ms=float(np.mean(render_ms)),
                  dlib=summary(rows, "dlib"), mediapipe=summary(rows, "mp"),
                  static_identity=args.static_identity,
                  mp_drive_pearson_mean=float(np.nanmean([r["mp_drive_pearson"] for r in rows])),
                  mp_ceiling_mean=float(np.nanmean([r["mp_ceiling"] for r in rows])),
                  mp_inner_scale=scale, mp_inner_outside_floor=floor,
                  upper_psnr_db_min=float(min(r["upper_psnr_db"] for r in rows)),
                  lips_dlab_max=float(max(r["lips_dlab"] for r in rows)),
                  lips_dlab_outline_max=float(max(r["lips_dlab_outline"] for r in rows)))
    if encoder is not None:
        values = [r["embedding_pearson"] for r in rows]
        result["embedding"] = dict(mean=float(np.nanmean(values)), min=float(np.nanmin(values)))
    for observer, label in (("dlib", "dlib"), ("mediapipe", "MediaPipe")):
        s = result[observer]
        print(f"{label}: Pearson mean {s['mean']:.3f}, min {s['min']:.3f} ({s['failed']} pairs unread); std ratio "
              f"{s['std_ratio'][0]:.2f}-{s['std_ratio'][1]:.2f}, inner {s['inner_std_ratio'][0]:.2f}-"
              f"{s['inner_std_ratio'][1]:.2f} ({s['inner_outside']} pairs outside {INNER_RATIO_RANGE}); worst: "
              + "; ".join(f"{a} <- {b} {r:.3f}" for a, b, r in s["worst"]))
        for rank, (a, b, _) in enumerate(s["worst"]):
            row = next(r for r in rows if (r["identity"], r["lip_ref"]) == (a, b))
            plot_pair(args.out / f"worst_{observer}_{rank + 1}.png", row, series[(a, b)], sheets[(a, b)])
    if encoder is not None:
        print(f"structure embedding vs lip opening: Pearson mean {result['embedding']['mean']:.3f}, "
              f"min {result['embedding']['min']:.3f}")
    print(f"MediaPipe against the drive: on the structure frames Pearson mean "
          f"{result['mp_drive_pearson_mean']:.3f}, on the real lip-reference frames {result['mp_ceiling_mean']:.3f}")
    print("MediaPipe / dlib inner-lip scale on the real frames: "
          + ", ".join(f"{name} {value:.2f}" for name, value in sorted(scale.items(), key=lambda item: item[1]))
          + f"; structure frames that follow the product's reading leave at least {floor} pairs outside "
          f"{INNER_RATIO_RANGE}")
    print(f"upper-face PSNR >= {result['upper_psnr_db_min']:.1f} dB; lips dLab <= {result['lips_dlab_max']:.1f} "
          f"(on the rendered lip outline <= {result['lips_dlab_outline_max']:.1f}); "
          f"fit {result['fit_ms']:.1f} ms/frame, structure render {result['render_ms']:.1f} ms/frame")
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"plots and results.json in {args.out}")


if __name__ == "__main__":
    main()
