"""Noise Sensor benchmark on real mouth crops (issue 5).

For each sample clip: the product's 512 x 512 face crops and mouth masks (face_crop; the clean
clip: reference and ground truth), then mouth-region flicker (per-frame brightness and
colour jumps) and jitter (per-frame sub-pixel shifts) of known size. The noisy clip's flow is
the generated flow `g`, the clean clip's flow the reference flow `r`. Reported per kernel size:
MNP before/after filtering, PSNR to the clean clip in the mouth region, CPBD of the mouth box,
and what the filter does to the clean clip itself. Also: how closely each flow method's noise
pattern reads the known injected jitter; the PSNR ceiling of any per-pixel sigma (the best
sigma per pixel, picked with the clean clip in hand); then ms/frame for flow + filter.

The default noise sizes are those of a visibly flickering generated clip, not a broken one:
a 6 grey-level brightness jump plus 3 per channel (about 30-33 dB PSNR in the mouth region) and
0.5 px of jitter, the scale of the sub-pixel wobble left by per-frame diffusion; the sweep shows
smaller and larger noise.

    .venv/bin/python bench/noise_sensor.py [--frames 50] [--out DIR]

Writes results.json and each clip's noise pattern (.npy and heat-map .png) to DIR (default
under the system temp folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freetalk_core import CROP_SIZE, face_crop
from freetalk_core.cpbd import cpbd
from freetalk_core.flow import DEFAULT_FLOW_METHOD, FLOW_METHODS, mouth_box, optical_flow
from freetalk_core.noise_sensor import (
    ideal_flow,
    mean_noise_pattern,
    noise_pattern,
    noise_pattern_heatmap,
    temporal_filter,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
CLIPS = ("MimicTalk__May_5s.mp4", "SadTalker__RD_Radio2_000.mp4",
         "SadTalker__WDA_KatieHill_000.mp4", "VideoRetalking__face_2.mp4")
KERNEL_SIZES = (3, 5, 7, 9)
NOISE_SWEEP = ((3.0, 0.25), (6.0, 0.5), (10.0, 0.75), (16.0, 1.0))
"""(flicker std grey levels, jitter std px); colour jumps are half the flicker."""
FLICKER_STD = 6.0
"""Per-frame brightness jump, grey levels (std), shared by the three channels."""
COLOUR_STD = 3.0
"""Per-frame, per-channel colour jump, grey levels (std)."""
JITTER_STD = 0.5
"""Per-frame shift of the mouth region, pixels (std, per axis)."""
ORACLE_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Candidate sigmas (frames) for the per-pixel ceiling."""


def jitter_noise_pattern(jitter_std: float) -> float:
    """The noise pattern that i.i.d. per-frame shifts of std `j` per axis produce: each flow
    component is the difference of two shifts, variance 2 j^2, and N is the norm of the (x, y)
    pair: 2 * sqrt(2) * j^2."""
    return 2.0 * np.sqrt(2.0) * jitter_std ** 2


def read_frames(path: Path, n: int) -> np.ndarray:
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == n:
                break
    return np.stack(frames)


def aligned_crops(path: Path, n: int):
    """The product's own crops (freetalk_core.face_crop): tracked, smoothed landmarks, a
    similarity transform per frame to the canonical 512 x 512 crop, and its mouth mask.

    Returns `(T, 512, 512, 3) uint8` crops and `(T, 512, 512) float32` mouth masks."""
    frames = read_frames(path, n)
    detector = face_crop.LandmarkDetector()
    landmarks, found = face_crop.track_landmarks(frames, detector)
    landmarks, _ = face_crop.fill_and_smooth(landmarks, found, source=path.name)
    transforms = face_crop.crop_transforms(landmarks, CROP_SIZE)
    crops = np.stack([face_crop.warp_to_crop(f, m, CROP_SIZE) for f, m in zip(frames, transforms)])
    masks = np.stack([face_crop.mouth_mask(face_crop.transform_points(lm, m), CROP_SIZE)
                      for lm, m in zip(landmarks, transforms)]).astype(np.float32)
    return crops, masks


def inject_noise(clean: np.ndarray, masks: np.ndarray, rng, flicker_std=FLICKER_STD,
                 colour_std=COLOUR_STD, jitter_std=JITTER_STD) -> np.ndarray:
    """Mouth-region flicker (per-frame brightness jump of std `flicker_std` plus per-channel
    jumps of std `colour_std`, grey levels) and jitter (per-frame shift of std `jitter_std` px
    per axis, bicubic), blended in with the mouth mask. `(T, 512, 512, 3) uint8`."""
    noisy = clean.astype(np.float32)
    for t in range(len(clean)):
        frame = noisy[t]
        if jitter_std > 0:
            dx, dy = rng.normal(0.0, jitter_std, size=2)
            m = np.float32([[1, 0, dx], [0, 1, dy]])
            frame = cv2.warpAffine(frame, m, frame.shape[1::-1], flags=cv2.INTER_CUBIC,
                                   borderMode=cv2.BORDER_REFLECT)
        if flicker_std > 0 or colour_std > 0:
            frame = frame + rng.normal(0.0, flicker_std) + rng.normal(0.0, colour_std, size=3)
        blend = masks[t][..., None]
        noisy[t] = noisy[t] + blend * (frame - noisy[t])
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """PSNR over the pixels of `region` ((T,H,W) bool), pooled over frames and channels."""
    diff = a.astype(np.float64)[region] - b.astype(np.float64)[region]
    mse = float((diff * diff).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def mean_cpbd(frames: np.ndarray, box) -> float:
    x0, y0, x1, y1 = box
    return float(np.mean([cpbd(f[y0:y1, x0:x1]) for f in frames]))


def structure_like(clean: np.ndarray) -> np.ndarray:
    """The clean motion with a different appearance (softer, other tone curve), standing in
    for structure frames: the same true motion, estimated from other pixels."""
    soft = np.stack([cv2.GaussianBlur(f, (0, 0), 1.2) for f in clean]).astype(np.float32)
    return np.clip(255.0 * (soft / 255.0) ** 0.8, 0, 255).astype(np.uint8)


def sq_error(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`(H, W)` squared error summed over frames and channels, pixels of `region` only."""
    diff = a.astype(np.float32) - b.astype(np.float32)
    return ((diff * diff).sum(axis=-1) * region).sum(axis=0)


def oracle_gain(noisy, clean, masks, region, kernel_size=5) -> float:
    """PSNR gain (dB) of the filter with the best of `ORACLE_SIGMAS` for each pixel, chosen
    with the clean clip in hand: the ceiling for any time-constant per-pixel sigma."""
    errors = np.stack([sq_error(temporal_filter(noisy, np.full(masks.shape[1:], s, np.float32),
                                                kernel_size, masks), clean, region)
                       for s in ORACLE_SIGMAS])
    count = 3 * region.sum()
    return float(10.0 * np.log10(errors[0].sum() / errors.min(axis=0).sum())) if count else 0.0


FILTER_MODES = ("trajectory", "static")
filter_mode = "trajectory"
"""How the bench filters: along the motion (`ideal_flow` of the two flows, the product's
default) or each pixel in place (METHOD.md's plain form)."""


def filtered_clip(frames, generated_flow, reference_flow, pattern, kernel_size, masks):
    """`temporal_filter` as the product runs it (see `filter_mode`)."""
    motion = ideal_flow(generated_flow, reference_flow) if filter_mode == "trajectory" else None
    return temporal_filter(frames, pattern, kernel_size, masks, motion=motion)


def evaluate_clip(name, clean, masks, rng, method, out_dir):
    box = mouth_box(masks, margin=16)
    region = masks > 0.5
    mask_mean = masks.mean(axis=0)
    cpbd_box = mouth_box(masks > 0.5, margin=0)
    reference_flow = optical_flow(clean, box, method)
    rows = []
    cases = {"flicker+jitter": {},
             "flicker": {"jitter_std": 0.0},
             "jitter": {"flicker_std": 0.0, "colour_std": 0.0}}
    clean_cpbd = mean_cpbd(clean, cpbd_box)
    for case, kw in cases.items():
        noisy = inject_noise(clean, masks, np.random.default_rng(rng.integers(1 << 31)), **kw)
        generated_flow = optical_flow(noisy, box, method)
        pattern = noise_pattern(generated_flow, reference_flow)
        mnp_before = mean_noise_pattern(pattern, mask_mean)
        psnr_before = psnr(noisy, clean, region)
        cpbd_before = mean_cpbd(noisy, cpbd_box)
        if case == "flicker+jitter":
            oracle = oracle_gain(noisy, clean, masks, region)
            np.save(out_dir / f"{Path(name).stem}_noise_pattern.npy", pattern)
            cv2.imwrite(str(out_dir / f"{Path(name).stem}_noise_pattern.png"),
                        cv2.cvtColor(noise_pattern_heatmap(pattern), cv2.COLOR_RGB2BGR))
        for k in KERNEL_SIZES:
            filtered = filtered_clip(noisy, generated_flow, reference_flow, pattern, k, masks)
            after = noise_pattern(optical_flow(filtered, box, method), reference_flow)
            rows.append({
                "clip": name, "case": case, "kernel": k, "mnp_before": mnp_before,
                "mnp_after": mean_noise_pattern(after, mask_mean),
                "psnr_before": psnr_before, "psnr_after": psnr(filtered, clean, region),
                "cpbd_clean": clean_cpbd, "cpbd_before": cpbd_before,
                "cpbd_after": mean_cpbd(filtered, cpbd_box),
                "oracle_gain": oracle if case == "flicker+jitter" else float("nan")})
    # noise size sweep, kernel 5
    for flicker_std, jitter_std in NOISE_SWEEP:
        noisy = inject_noise(clean, masks, np.random.default_rng(rng.integers(1 << 31)),
                             flicker_std, flicker_std / 2, jitter_std)
        generated_flow = optical_flow(noisy, box, method)
        pattern = noise_pattern(generated_flow, reference_flow)
        filtered = filtered_clip(noisy, generated_flow, reference_flow, pattern, 5, masks)
        after = noise_pattern(optical_flow(filtered, box, method), reference_flow)
        rows.append({
            "clip": name, "case": f"sweep flicker {flicker_std:g} colour {flicker_std / 2:g} jitter {jitter_std:g}",
            "kernel": 5, "mnp_before": mean_noise_pattern(pattern, mask_mean),
            "mnp_after": mean_noise_pattern(after, mask_mean),
            "psnr_before": psnr(noisy, clean, region), "psnr_after": psnr(filtered, clean, region),
            "cpbd_clean": clean_cpbd, "cpbd_before": float("nan"), "cpbd_after": float("nan")})
    # the clean clip, filtered: against its own flow (the setting) and against the
    # flow of a structure-like rendition of the same motion
    clean_flow = reference_flow
    structure_flow = optical_flow(structure_like(clean), box, method)
    for reference_name, reference in (("clean", clean_flow), ("structure-like", structure_flow)):
        pattern = noise_pattern(clean_flow, reference)
        for k in KERNEL_SIZES:
            filtered = filtered_clip(clean, clean_flow, reference, pattern, k, masks)
            rows.append({
                "clip": name, "case": f"clean vs {reference_name} ref", "kernel": k,
                "mnp_before": mean_noise_pattern(pattern, mask_mean), "mnp_after": float("nan"),
                "psnr_before": float("inf"), "psnr_after": psnr(filtered, clean, region),
                "mse": float(sq_error(filtered, clean, region).sum() / (3 * region.sum())),
                "cpbd_clean": clean_cpbd, "cpbd_before": clean_cpbd,
                "cpbd_after": mean_cpbd(filtered, cpbd_box)})
    return rows


def flow_accuracy(clean: np.ndarray, masks: np.ndarray, rng) -> dict:
    """Endpoint error and time of each flow method on a real mouth box with known shifts."""
    box = mouth_box(masks, margin=16)
    x0, y0, x1, y1 = box
    frame = clean[0].astype(np.float32)
    shifts = rng.normal(0.0, 1.0, size=(10, 2))
    frames = [clean[0]]
    for dx, dy in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        frames.append(np.clip(np.rint(cv2.warpAffine(frame, m, frame.shape[1::-1],
                                                     flags=cv2.INTER_CUBIC,
                                                     borderMode=cv2.BORDER_REFLECT)), 0, 255)
                      .astype(np.uint8))
    frames = np.stack(frames)
    truth = np.diff(np.concatenate([[[0.0, 0.0]], shifts]), axis=0)
    result = {}
    for method in FLOW_METHODS:
        start = time.perf_counter()
        flow = optical_flow(frames, box, method)
        seconds = time.perf_counter() - start
        inner = flow[:, y0 + 16:y1 - 16, x0 + 16:x1 - 16]
        err = np.linalg.norm(inner - truth[:, None, None, :].astype(np.float32), axis=-1)
        result[method] = {"epe_mean": float(err.mean()), "epe_median": float(np.median(err)),
                              "ms_per_flow": 1000 * seconds / len(shifts)}
    return result


def noise_estimate_accuracy(clean: np.ndarray, masks: np.ndarray, rng) -> dict:
    """Median noise pattern inside the fully masked mouth, per flow method, for three clips
    whose true noise pattern is known: jitter only and flicker + jitter (truth
    `jitter_noise_pattern(JITTER_STD)`: flicker is not motion), and the clean clip against a
    structure-like rendition of the same motion (truth 0)."""
    box = mouth_box(masks, margin=16)
    inner = (masks > 0.99).all(axis=0)
    seed = int(rng.integers(1 << 31))
    clips = {"jitter": inject_noise(clean, masks, np.random.default_rng(seed), flicker_std=0.0,
                                    colour_std=0.0),
             "flicker+jitter": inject_noise(clean, masks, np.random.default_rng(seed)),
             "structure-like": structure_like(clean)}
    result = {}
    for method in FLOW_METHODS:
        reference = optical_flow(clean, box, method)
        result[method] = {label: float(np.median(noise_pattern(optical_flow(c, box, method),
                                                               reference)[inner]))
                          for label, c in clips.items()}
    return result


def timing(clean: np.ndarray, masks: np.ndarray, method: str, repeats: int = 3) -> dict:
    """ms/frame for flow (generated + reference) + noise pattern + filter at 512 x 512, for
    the mouth box and for the whole crop."""
    out = {}
    noisy = inject_noise(clean, masks, np.random.default_rng(0))
    n = len(clean)
    for label, box, mask in (("mouth box", mouth_box(masks, 16), masks), ("whole crop", None, None)):
        best = {}
        for _ in range(repeats):
            t0 = time.perf_counter()
            g = optical_flow(noisy, box, method)
            r = optical_flow(clean, box, method)
            t1 = time.perf_counter()
            pattern = noise_pattern(g, r)
            t2 = time.perf_counter()
            filtered_clip(noisy, g, r, pattern, 5, mask)
            t3 = time.perf_counter()
            for key, value in (("flow (g and r)", t1 - t0), ("noise pattern", t2 - t1),
                               ("filter k=5", t3 - t2), ("total", t3 - t0)):
                best[key] = min(best.get(key, np.inf), 1000 * value / n)
        out[label] = best
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--method", default=DEFAULT_FLOW_METHOD, choices=FLOW_METHODS)
    parser.add_argument("--clips", nargs="*", default=list(CLIPS))
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "freetalk-bench" / "noise_sensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filter", choices=FILTER_MODES, default="trajectory",
                        help="smooth along the motion (default, as the product does) or in place")
    args = parser.parse_args(argv)
    global filter_mode
    filter_mode = args.filter
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.setNumThreads(2)
    rng = np.random.default_rng(args.seed)

    rows, accuracy, sensing, clips = [], {}, {}, {}
    for name in args.clips:
        clean, masks = aligned_crops(SAMPLES / name, args.frames)
        clips[name] = (clean, masks)
        accuracy[name] = flow_accuracy(clean, masks, rng)
        sensing[name] = noise_estimate_accuracy(clean, masks, rng)
        t0 = time.perf_counter()
        rows += evaluate_clip(name, clean, masks, rng, args.method, args.out)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    first_name = next(iter(clips))
    first = clips[first_name]
    speed = timing(*first, args.method)

    print("\n## Flow method: endpoint error (px) on real mouth boxes with known shifts, std 1 px")
    print("| method | mean EPE | median EPE | ms per flow (mouth box) |\n|---|---|---|---|")
    for method in FLOW_METHODS:
        e = np.mean([accuracy[c][method]["epe_mean"] for c in accuracy])
        md = np.mean([accuracy[c][method]["epe_median"] for c in accuracy])
        ms = np.mean([accuracy[c][method]["ms_per_flow"] for c in accuracy])
        print(f"| {method} | {e:.3f} | {md:.3f} | {ms:.1f} |")

    truth = jitter_noise_pattern(JITTER_STD)
    print(f"\n## Flow method as a noise sensor: median N(p) inside the mouth, mean over clips "
          f"(truth {truth:.3f} for jitter {JITTER_STD:g} px with or without flicker; 0 for "
          f"structure-like)")
    print("| method | jitter | flicker+jitter | clean vs structure-like |\n|---|---|---|---|")
    for method in FLOW_METHODS:
        v = {k: np.mean([sensing[c][method][k] for c in sensing]) for k in sensing[first_name][method]}
        print(f"| {method} | {v['jitter']:.3f} | {v['flicker+jitter']:.3f} | "
              f"{v['structure-like']:.3f} |")

    print(f"\n## Injected noise: flicker {FLICKER_STD:g} + colour {COLOUR_STD:g} grey levels, "
          f"jitter {JITTER_STD:g} px (std, per frame); {args.frames} frames per clip")
    print(f"\n## Per clip, flicker+jitter, kernel 5 (flow: {args.method}, filter: {args.filter})")
    print("| clip | MNP before | MNP after | reduction | PSNR before | PSNR after | gain dB | "
          "per-pixel sigma ceiling dB | CPBD noisy | CPBD filtered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] == "flicker+jitter" and r["kernel"] == 5:
            print(f"| {r['clip']} | {r['mnp_before']:.4f} | {r['mnp_after']:.4f} | "
                  f"{100 * (1 - r['mnp_after'] / r['mnp_before']):.1f}% | {r['psnr_before']:.2f} | "
                  f"{r['psnr_after']:.2f} | {r['psnr_after'] - r['psnr_before']:+.2f} | "
                  f"{r['oracle_gain']:+.2f} | {r['cpbd_before']:.4f} | {r['cpbd_after']:.4f} |")

    print("\n## Mean over clips, by kernel size")
    print("| case | kernel | MNP before | MNP after | MNP reduction | PSNR gain dB | CPBD noisy | CPBD filtered | CPBD clean |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for case in dict.fromkeys(r["case"] for r in rows if not r["case"].startswith("sweep")):
        for k in KERNEL_SIZES:
            sel = [r for r in rows if r["case"] == case and r["kernel"] == k]
            if not sel:
                continue
            mb = np.mean([r["mnp_before"] for r in sel])
            ma = np.mean([r["mnp_after"] for r in sel])
            if case.startswith("clean"):
                mse = np.mean([r["mse"] for r in sel])
                gain = float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
                red = float("nan")
            else:
                gain = np.mean([r["psnr_after"] - r["psnr_before"] for r in sel])
                red = 100 * np.mean([1 - r["mnp_after"] / r["mnp_before"] for r in sel])
            cb = np.mean([r["cpbd_before"] for r in sel])
            ca = np.mean([r["cpbd_after"] for r in sel])
            cc = np.mean([r["cpbd_clean"] for r in sel])
            summary[(case, k)] = {"mnp_reduction": red, "psnr": gain, "cpbd_after": ca, "cpbd_before": cb,
                                      "worst_psnr": min(r["psnr_after"] for r in sel),
                                      "worst_drop": max(100 * (1 - r["cpbd_after"] / r["cpbd_before"])
                                                     for r in sel)}
            psnr_label = f"PSNR to input {gain:.2f}" if case.startswith("clean") else f"{gain:+.2f}"
            print(f"| {case} | {k} | {mb:.4f} | {ma:.4f} | {red:.1f}% | {psnr_label} | "
                  f"{cb:.4f} | {ca:.4f} | {cc:.4f} |")

    print("\n## Clean clip (no injected noise) through the filter: change in the mouth region")
    print("PSNR of the filtered clean clip against the clean clip (pooled over clips; worst clip), "
          "CPBD drop (mean; worst clip)")
    print("| reference | kernel | PSNR filtered vs input (dB) | worst clip | CPBD drop | worst clip |")
    print("|---|---|---|---|---|---|")
    for case in ("clean vs clean ref", "clean vs structure-like ref"):
        for k in KERNEL_SIZES:
            s = summary[(case, k)]
            drop = 100 * (1 - s["cpbd_after"] / s["cpbd_before"])
            print(f"| {case.split(' vs ')[1]} | {k} | {s['psnr']:.2f} | {s['worst_psnr']:.2f} | "
                  f"{drop:.2f}% | {s['worst_drop']:.2f}% |")

    print("\n## Noise size sweep, kernel 5, mean over clips (per-clip PSNR gain in brackets)")
    print("| injected noise | MNP before | MNP after | MNP reduction | PSNR before | PSNR gain dB |")
    print("|---|---|---|---|---|---|")
    for case in dict.fromkeys(r["case"] for r in rows if r["case"].startswith("sweep")):
        sel = [r for r in rows if r["case"] == case]
        gains = [r["psnr_after"] - r["psnr_before"] for r in sel]
        print(f"| {case[6:]} | {np.mean([r['mnp_before'] for r in sel]):.3f} | "
              f"{np.mean([r['mnp_after'] for r in sel]):.3f} | "
              f"{100 * np.mean([1 - r['mnp_after'] / r['mnp_before'] for r in sel]):.1f}% | "
              f"{np.mean([r['psnr_before'] for r in sel]):.2f} | {np.mean(gains):+.2f} "
              f"({', '.join(f'{g:+.2f}' for g in gains)}) |")

    print(f"\n## ms/frame at 512x512, {args.frames} frames, this CPU ({cv2.getNumThreads()} OpenCV threads)")
    print("| region | flow (g and r) | noise pattern | filter k=5 | total |\n|---|---|---|---|---|")
    for label, t in speed.items():
        print(f"| {label} | {t['flow (g and r)']:.1f} | {t['noise pattern']:.1f} | "
              f"{t['filter k=5']:.1f} | {t['total']:.1f} |")

    with open(args.out / "results.json", "w") as f:
        json.dump({"rows": rows, "flow_accuracy": accuracy, "noise_sensing": sensing, "timing": speed,
                       "settings": {"frames": args.frames, "method": args.method, "filter": args.filter,
                                     "flicker_std": FLICKER_STD, "colour_std": COLOUR_STD,
                                     "jitter_std": JITTER_STD}}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
