"""Face detection rates of the detectors `--detector` offers, on the sample clips.

For each sample clip and detector: the share of frames where a whole-frame detection finds a
face (`detect_box`, every `--step`-th frame), the share found by the tracker the face_crop stage
runs (`track_landmarks` over the first `--frames` frames), and ms per frame of each. dlib is
always measured; insightface where MODELS/insightface holds the buffalo_l pack's det_10g.onnx.

    .venv/bin/python bench/face_detectors.py [--models DIR] [--frames 50] [--step 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freetalk_core import (
    face_crop,  # noqa: E402
    video,  # noqa: E402
)
from freetalk_core.errors import ModelFileError  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"


def measure(detector, path: Path, frames: int, step: int) -> dict:
    clip = video.read_video(path, max_frames=frames)
    start = time.perf_counter()
    found_whole = [detector.detect_box(frame) is not None for frame in clip[::step]]
    whole_ms = 1000 * (time.perf_counter() - start) / max(len(found_whole), 1)
    start = time.perf_counter()
    _, found = face_crop.track_landmarks(iter(clip), detector)
    track_ms = 1000 * (time.perf_counter() - start) / max(len(clip), 1)
    return {"size": f"{clip.shape[2]}x{clip.shape[1]}", "detected": sum(found_whole) / len(found_whole),
            "tracked": float(found.mean()), "detect_ms": whole_ms, "track_ms": track_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    detectors = {"dlib": face_crop.make_detector("dlib")}
    if args.models is not None:
        try:
            detectors["insightface"] = face_crop.make_detector("insightface", args.models)
        except ModelFileError as exc:
            print(f"insightface not measured: {exc}")
        else:
            import onnx

            from freetalk_core.models import insightface_detector_path

            if onnx.load(str(insightface_detector_path(args.models))).producer_name == "freetalk":
                print("warning: the insightface detector is a tiny random-weight one (`freetalk models "
                      "tiny`-style): its rates say nothing about SCRFD")
    else:
        print("insightface not measured: no --models")
    clips = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".mp4", ".mpg"))
    results = {}
    print(f"{'clip':48s} {'size':>9s} {'detector':>11s} {'detected':>8s} {'tracked':>7s} {'det ms':>7s} {'trk ms':>7s}")
    for path in clips:
        for name, detector in detectors.items():
            row = measure(detector, path, args.frames, args.step)
            results.setdefault(path.name, {})[name] = row
            print(f"{path.name:48s} {row['size']:>9s} {name:>11s} {row['detected']:8.0%} {row['tracked']:7.0%} "
                  f"{row['detect_ms']:7.0f} {row['track_ms']:7.0f}")
    for name in detectors:
        rows = [r[name] for r in results.values()]
        print(f"{name}: mean detected {sum(r['detected'] for r in rows) / len(rows):.1%}, "
              f"mean tracked {sum(r['tracked'] for r in rows) / len(rows):.1%} over {len(rows)} clips")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
