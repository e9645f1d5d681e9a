"""`freetalk dataset` on 30 randomly corrupted variants of a sample clip (truncations, flipped
bytes, wrong headers; seeded, so every run sees the same files) and the broken inputs users
send: the run completes, every item is done or failed with a one-line reason a user can act on
(never a bare Python exception), and the failures' tracebacks are in the store's logs.

Variants alternate between the identity and the lip reference (with its audio). Clips are 8
frames and diffusion runs 2 steps without guidance: most variants fail at the input check in
well under a second, the ones that still decode are short."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import faststart_copy, write_sample_pair

from freetalk_core import video
from storage import Store

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 8
VARIANTS = 30
SEED = 19
OPTIONS = ["--steps", "2", "--guidance", "1", "--batch-size", "4"]
OTHER_FORMATS = [b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WAVE", b"%PDF-1.4\n", b"PK\x03\x04",
                 b"ID3\x03"]
MP4_BOXES = [b"ftyp", b"moov", b"mdat", b"trak", b"mvhd", b"stsz", b"stco"]


def corrupted(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """`data` cut off (`truncate`), with 1-63 bits flipped anywhere (`flip`), or with a wrong
    header (`header`: random leading bytes, another format's signature, a renamed MP4 box, or
    bytes overwritten inside the index)."""
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:int(rng.integers(0, len(b)))])
    if kind == "flip":
        for position in rng.integers(0, len(b), int(rng.integers(1, 64))):
            b[position] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    how = int(rng.integers(0, 4))
    if how == 0:
        n = int(rng.integers(4, 64))
        b[:n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif how == 1:
        signature = OTHER_FORMATS[int(rng.integers(0, len(OTHER_FORMATS)))]
        b[:len(signature)] = signature
    elif how == 2:
        at = b.find(MP4_BOXES[int(rng.integers(0, len(MP4_BOXES)))])
        b[at:at + 4] = rng.integers(97, 123, 4, dtype=np.uint8).tobytes()
    else:
        moov = b.find(b"moov")
        for position in rng.integers(moov, moov + 600, int(rng.integers(1, 16))):
            b[position] = int(rng.integers(0, 256))
    return bytes(b)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, samples_dir):
    folder = tmp_path_factory.mktemp("fuzz")
    write_sample_pair(folder, samples_dir, FRAMES, names=("identity-plain.mp4", "lip-plain.mp4"))
    # Index first (as streaming exports write it): cut-off copies still open, with frames missing.
    bases = {role: faststart_copy(folder / f"{role}-plain.mp4", folder / f"{role}.mp4").read_bytes()
             for role in ("identity", "lip")}
    rng = np.random.default_rng(SEED)
    rows = ["item_id,identity,lip_ref"]
    for i in range(VARIANTS):
        kind = ("truncate", "flip", "header")[i % 3]
        role = ("identity", "lip")[i % 2]
        name = f"v{i:02d}-{role}-{kind}.mp4"
        (folder / name).write_bytes(corrupted(bases[role], kind, rng))
        rows.append(f"fuzz-{i:02d},{name if role == 'identity' else 'identity.mp4'},"
                    f"{name if role == 'lip' else 'lip.mp4'}")
    # The broken inputs users send, and a one-frame identity (a still: it works).
    plain = (folder / "identity-plain.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(plain[:len(plain) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is a text file, renamed\n")
    shutil.copy(samples_dir / "EDTalk__mouth_source.wav", folder / "audio-only.wav")
    write_sample_pair(folder, samples_dir, 1, names=("one-frame.mp4", "one-frame-lip.mp4"))
    rows += ["truncated,truncated.mp4,lip.mp4", "empty,empty.mp4,lip.mp4", "text,identity.mp4,text.mp4",
             "audio-only,audio-only.wav,lip.mp4", "missing,nowhere.mp4,lip.mp4", "one-frame,one-frame.mp4,lip.mp4"]
    path = folder / "fuzz.csv"  # its own run name: dataset[fuzz]
    path.write_text("\n".join(rows) + "\n")
    return path


NAMED = {"truncated": "truncated.mp4", "empty": "empty (0 bytes)", "text": "text.mp4",
         "audio-only": "no video stream", "missing": "nowhere.mp4"}
PYTHON_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
"""How `one_line` writes an error that is not a user-fixable `FreetalkError`: a bug."""


def test_thirty_corrupted_variants_each_end_done_or_failed_with_a_reason(manifest, prefect_server, tiny_models,
                                                                           tmp_path):
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_server}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", str(manifest), "--store", str(store_dir),
                             "--models", str(tiny_models), "--workers", "2", *OPTIONS],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert result.returncode == 1, result.stderr[-3000:]  # something failed, and the run completed
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    store = Store(store_dir)
    ids = [f"fuzz-{i:02d}" for i in range(VARIANTS)] + [*NAMED, "one-frame"]
    rows = {r["item_id"]: r for r in store.items()}
    assert sorted(rows) == sorted(ids)
    failure_lines = {line.split(": ", 2)[1]: line for line in result.stderr.splitlines()
                     if line.startswith("failed: ")}
    done = [i for i in ids if rows[i]["status"] == "done"]
    failed = [i for i in ids if rows[i]["status"] == "failed"]
    assert len(done) + len(failed) == len(ids), {i: rows[i]["status"] for i in ids}
    assert f"{len(done)} done, {len(failed)} failed" in result.stdout
    for item in failed:
        error = rows[item]["error"]
        assert error and "\n" not in error and not PYTHON_EXCEPTION.match(error), (item, error)
        log = store.log_path(item)
        assert failure_lines[item].endswith(f"(details in {log})"), failure_lines[item]
        assert "Traceback (most recent call last)" in log.read_text()
    for item in done:
        info = video.probe(rows[item]["output"])
        assert info.n_frames == FRAMES and (info.width, info.height) == (512, 512)
    for item, words in NAMED.items():
        assert rows[item]["status"] == "failed" and words in rows[item]["error"], rows[item]
    assert rows["one-frame"]["status"] == "done"
    fuzz_done = sum(i.startswith("fuzz-") for i in done)
    print(f"fuzz: {fuzz_done} of {VARIANTS} variants done, {VARIANTS - fuzz_done} failed; "
          f"{len(ids)} items in {seconds:.0f} s")
    assert 0 < fuzz_done < VARIANTS  # the corruptions reach both outcomes
