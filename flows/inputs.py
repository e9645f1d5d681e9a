"""Checks of a pair's input files, made before any stage runs: a file that cannot be used
fails at once with one line naming the input and what to do. Light to import (PyAV only), so
`freetalk generate` reports a broken input within a second."""

from __future__ import annotations

from pathlib import Path

from freetalk_core import video
from freetalk_core.errors import VideoReadError

INPUT_HINTS = {
    "identity": "the identity must be a video of the person who should speak",
    "lip_ref": "the lip reference must be a video of someone speaking; give an audio-only file with --audio",
}


def check_input(role: str, path: Path) -> None:
    """Raise `VideoReadError` (one line naming the input and what to do) when the `role`
    input (identity, lip_ref or audio) cannot be used: missing, empty, truncated, not a video,
    or, for audio, without an audio stream."""
    if not path.is_file():
        raise VideoReadError(f"{role} file not found: {path} (check the path)")
    if role == "audio":
        try:
            found = video.has_audio(path)
        except VideoReadError as exc:
            raise VideoReadError(f"audio: {exc}") from None
        if not found:
            raise VideoReadError(f"audio file {path} has no audio stream; pass a file with audio "
                                 f"(WAV, MP3, M4A or a video with sound) or leave out --audio")
        return
    try:
        video.check_video(path)
    except VideoReadError as exc:
        if "no video stream" in str(exc):
            raise VideoReadError(f"{role} {path} has no video stream (an audio-only file?); "
                                 f"{INPUT_HINTS[role]}") from None
        raise VideoReadError(f"{role}: {exc}") from None
