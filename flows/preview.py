"""Side-by-side previews a person looks at: identity | lip reference | structure | output."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freetalk_core import video
from storage import Store, arrays
from tasks.common import mask_weights
from tasks.frames import Crops, StoredStructureFrames

PANELS = ("identity", "lip reference", "structure", "output")
PANEL_SIZE = 256


def panel_frames(store: Store, item_id: str) -> dict:
    """The frames of each panel (indexable by slice): the crops, remade from the item's input
    videos, the structure frames and the filtered crops."""
    return {"identity": Crops(store, item_id, "identity"), "lip reference": Crops(store, item_id, "lip_ref"),
            "structure": StoredStructureFrames(store, item_id),
            "output": store.array(item_id, arrays.FILTERED_FRAMES)}


def _label(image: np.ndarray, text: str) -> np.ndarray:
    import cv2

    image = image.copy()
    cv2.putText(image, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def side_by_side_frames(store: Store, item_id: str, size: int = PANEL_SIZE):
    """Yields `(size, 4 * size, 3) uint8` rows, one per output frame."""
    import cv2

    panels = list(panel_frames(store, item_id).items())
    masks = store.array(item_id, arrays.MOUTH_MASKS)
    n = panels[0][1].shape[0]
    for start in range(0, n, 25):
        blocks = [(name, a[start:start + 25]) for name, a in panels]
        # The output panel shows what the MP4 shows: the filtered crop inside the mouth mask only.
        m = mask_weights(masks[start:start + 25])[..., None]
        blended = blocks[0][1] * (1 - m) + blocks[-1][1] * m
        blocks[-1] = (blocks[-1][0], np.clip(blended + 0.5, 0, 255).astype(np.uint8))
        for i in range(blocks[0][1].shape[0]):
            yield np.concatenate([_label(cv2.resize(b[i], (size, size), interpolation=cv2.INTER_AREA), name)
                                  for name, b in blocks], axis=1)


def lip_opening_curves(store: Store, item_id: str) -> dict[str, np.ndarray]:
    """Lip opening per frame (outer-lip distance over inter-ocular distance) of the lip-reference
    crops and of the structure frames, both measured with the landmark detector on the images:
    `{"lip reference": (T,), "structure": (T,)}` float32, NaN where it finds no face."""
    from freetalk_core.face_crop import LandmarkDetector
    from freetalk_core.lips import lip_opening

    detector = LandmarkDetector()
    curves = {}
    panels = panel_frames(store, item_id)
    for name in ("lip reference", "structure"):
        images = panels[name]
        landmarks = np.concatenate([detector.detect_all(images[start:start + 25])
                                    for start in range(0, images.shape[0], 25)])
        curves[name] = lip_opening(landmarks)
    return curves


def lip_distance_plot(store: Store, item_id: str, path: Path) -> Path:
    """Three panels over the frames: the lip opening of the lip reference and of the structure
    frames as the landmark detector sees them (with their Pearson correlation); h_t with the
    anchor frame; lambda_t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = store.read(item_id, arrays.LIP_DISTANCE)
    lam = store.read(item_id, arrays.LAMBDAS)
    anchor = int(store.read(item_id, arrays.ANCHOR_INDEX))
    curves = lip_opening_curves(store, item_id)
    fig, (ax0, ax1, ax2) = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    a, b = curves["lip reference"], curves["structure"]
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    moving = len(a) > 2 and a.std() > 0 and b.std() > 0
    pearson = float(np.corrcoef(a, b)[0, 1]) if moving else float("nan")
    for name, curve in curves.items():
        ax0.plot(curve, label=f"{name} (detected)")
    ax0.set_ylabel("opening / inter-ocular")
    ax0.set_title(f"lip transfer: Pearson {pearson:.3f}", fontsize=9)
    ax0.legend(loc="upper right", fontsize=8)
    ax1.plot(h, label="lip reference h_t (crop px)")
    ax1.axvline(anchor, color="k", ls="--", lw=1, label=f"anchor a = {anchor}")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.plot(lam, color="tab:orange", label="lambda_t")
    ax2.set_xlabel("frame")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_previews(store_dir: Path, item_id: str, out_dir: Path, stem: str = "preview") -> list[Path]:
    """Contact sheet PNG, side-by-side MP4 and lip-distance plot for one item."""
    import cv2

    store = Store(store_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fps = float(store.attrs(item_id, arrays.FACE_CROP)["fps"])
    mp4 = out_dir / f"{stem}_side_by_side.mp4"
    video.write_video(mp4, side_by_side_frames(store, item_id), fps)
    n = store.array(item_id, arrays.FILTERED_FRAMES).shape[0]
    picks = set(np.linspace(0, n - 1, min(n, 6)).round().astype(int).tolist())
    rows = [row for t, row in enumerate(side_by_side_frames(store, item_id)) if t in picks]
    png = out_dir / f"{stem}_side_by_side.png"
    cv2.imwrite(str(png), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    plot = lip_distance_plot(store, item_id, out_dir / f"{stem}_lip_distance.png")
    return [png, mp4, plot]
