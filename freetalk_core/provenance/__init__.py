"""Provenance of freetalk's outputs: every video is marked as synthetic.

- `watermark`: an invisible mark in the frames (a freetalk tag and an id mapping to the store
  item) that survives re-encoding, scaling and trimming;
- `signing`: a signed C2PA manifest in the MP4 (the edit, its digital source type, the inputs
  as ingredients, models and parameters);
- `label`: an optional visible label;
- `metadata_tags`: MP4 metadata saying the video is synthetic;
- `verify`: what a file carries of all this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from freetalk_core.provenance import label, signing, watermark
from freetalk_core.provenance.signing import Ingredient, ManifestReport, read_manifest, sign_mp4
from freetalk_core.provenance.watermark import Detection, watermark_id_for

VERIFY_MAX_FRAMES = 150
"""Frames (spread over the clip) that `verify` reads the watermark from."""


def freetalk_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("freetalk")
    except PackageNotFoundError:
        return "unknown"


def metadata_tags() -> dict[str, str]:
    """MP4 metadata of every output: synthetic, and by which freetalk version."""
    text = f"Synthetic video (AI-generated lip sync) made by freetalk {freetalk_version()}"
    return {"comment": text, "description": text}


def mark_frames(frames: Iterable[np.ndarray], watermark_id: str | None,
                label_text: str | None = None) -> Iterator[np.ndarray]:
    """Stream `(H, W, 3) uint8` RGB frames with the optional visible label, then the
    invisible watermark (none when `watermark_id` is None)."""
    if label_text:
        frames = label.label_frames(frames, label_text)
    if watermark_id is not None:
        frames = watermark.embed_frames(frames, watermark_id)
    return iter(frames)


@dataclass
class Verification:
    """One file's verdict: manifest, watermark, and the exit status it stands for."""

    path: str
    manifest: ManifestReport | None
    detection: Detection | None
    error: str | None = None

    @property
    def marked(self) -> bool:
        return bool((self.manifest and self.manifest.present and self.manifest.valid)
                    or (self.detection and self.detection.found))

    @property
    def exit_code(self) -> int:
        if self.error:
            return 2
        return 0 if self.marked else 1


def _sampled_frames(path, max_frames: int) -> Iterator[np.ndarray]:
    """Up to `max_frames` decoded frames (at the video's own rate) spread evenly over it."""
    from freetalk_core import video

    info = video.probe(path)
    fps = info.fps or video.DEFAULT_FPS
    n = max(1, video.output_frame_count(info.duration, fps))
    indices = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(np.int64))
    return video.read_frames(path, fps=fps, indices=indices)


def verify(path: str | Path, max_frames: int = VERIFY_MAX_FRAMES) -> Verification:
    """Read the C2PA manifest and the watermark of one file; unreadable files are reported,
    never raised."""
    from freetalk_core.errors import FreetalkError

    path = Path(path)
    if not path.is_file():
        return Verification(str(path), None, None, error=f"{path}: no such file")
    manifest = read_manifest(path)
    try:
        detection = watermark.detect(_sampled_frames(path, max_frames))
    except (FreetalkError, ValueError, OSError) as exc:
        return Verification(str(path), manifest, None, error=f"cannot decode the video: {exc}")
    return Verification(str(path), manifest, detection)


def format_verification(v: Verification) -> str:
    """The block `freetalk verify` prints for one file."""
    lines = [f"{v.path}:"]
    m, d = v.manifest, v.detection
    if m is None or not m.present:
        lines.append("  C2PA manifest: absent" + (f" (unreadable: {m.error})" if m and m.error else ""))
    else:
        why = "" if m.valid else f" ({'; '.join(m.problems) or m.state})"
        lines.append(f"  C2PA manifest: present, {'valid' if m.valid else 'INVALID'}{why}"
                     f" [{m.state}]")
        trust = "self-issued local signer, not in any trust list" if m.self_issued else (
            "trusted" if m.state == "Trusted" else "signer not in the trust list")
        lines.append(f"    signer: {m.signer or '?'} ({trust})")
        lines.append(f"    actions: {', '.join(m.actions) or 'none'}")
        for source_type in m.digital_source_types:
            lines.append(f"    digital source type: {source_type.rsplit('/', 1)[-1]}")
        lines.append(f"    ingredients: {', '.join(m.ingredients) or 'none'}")
        if m.generation and m.generation.get("watermark"):
            lines.append(f"    watermark id in manifest: {m.generation['watermark'].get('id')}")
    if d is None:
        lines.append(f"  watermark: not read ({v.error})")
    elif d.found:
        lines.append(f"  watermark: found, payload freetalk:{d.watermark_id} "
                     f"(confidence {d.confidence:.2f}, {d.frames_used} frames used)")
    else:
        lines.append(f"  watermark: not found (confidence {d.confidence:.2f}, {d.frames_used} frames used)")
    if d is not None and d.found and (m is None or not m.present):
        lines.append("  note: the manifest is absent but the watermark is found: the metadata was "
                     "stripped (e.g. by a re-encode); this is a freetalk output")
    verdict = {0: "MARKED as made by freetalk", 1: "not marked", 2: f"unreadable: {v.error}"}[v.exit_code]
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
