"""MediaPipe face-mesh landmarks of frames in .npy files: the independent observer of
bench/structure_observers.py, run with the Python of a separate environment (mediapipe 0.10
pins numpy < 2), so it imports nothing of the product.

Reads lines `FRAMES.npy LANDMARKS.npy` on stdin: FRAMES (N, H, W, 3) uint8 RGB; writes
LANDMARKS (N, 468, 2) float32 image px (NaN where no face is found) and answers `ok` on stdout.
Each frame is read on its own (static-image mode: no tracking between frames).
"""

import sys

import mediapipe as mp
import numpy as np


def main() -> None:
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                           min_detection_confidence=0.5)
    for line in sys.stdin:
        source, target = line.split()
        frames = np.load(source)
        out = np.full((len(frames), 468, 2), np.nan, np.float32)
        for i, frame in enumerate(frames):
            result = mesh.process(np.ascontiguousarray(frame))
            if result.multi_face_landmarks:
                points = result.multi_face_landmarks[0].landmark
                out[i] = [(p.x * frame.shape[1], p.y * frame.shape[0]) for p in points]
        np.save(target, out)
        print("ok", flush=True)


if __name__ == "__main__":
    main()
