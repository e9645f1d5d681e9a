"""Provenance of outputs: signed C2PA manifest, invisible watermark, label, `freetalk verify`."""

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from storage import Store, arrays

SAMPLE_EXTENSIONS = (".mp4", ".mpg", ".mov", ".avi", ".mkv", ".webm")


@pytest.fixture(scope="module", autouse=True)
def config_dir(tmp_path_factory):
    """A fresh per-user config folder, so the local signer is created here, not in ~."""
    folder = tmp_path_factory.mktemp("config")
    mp = pytest.MonkeyPatch()
    mp.setenv("FREETALK_CONFIG_DIR", str(folder))
    mp.delenv("FREETALK_C2PA_CERT", raising=False)
    mp.delenv("FREETALK_C2PA_KEY", raising=False)
    yield folder
    mp.undo()


def _transcode(src: Path, dst: Path, crf: int, scale: float = 1.0, seconds: float | None = None) -> Path:
    """Decode and re-encode with plain PyAV (H.264, yuv420p): what a platform does on upload."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        stream_in = inp.streams.video[0]
        rate = Fraction(stream_in.average_rate)
        stream = out.add_stream("libx264", rate=rate)
        stream.width = int(stream_in.codec_context.width * scale) // 2 * 2
        stream.height = int(stream_in.codec_context.height * scale) // 2 * 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        stream.codec_context.time_base = 1 / rate
        for n, frame in enumerate(inp.decode(stream_in)):
            if seconds is not None and n >= seconds * rate:
                break
            image = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
            image.pts, image.time_base = n, 1 / rate
            out.mux(stream.encode(image))
        out.mux(stream.encode(None))
    return dst


@pytest.fixture(scope="module")
def marked_clip(tmp_path_factory, samples_dir):
    """3 s of a sample, marked and signed the way outputs are."""
    from freetalk_core import provenance, video

    source = samples_dir / "MimicTalk__May_5s.mp4"
    frames = video.read_video(source, fps=25.0, max_frames=75)
    out = tmp_path_factory.mktemp("marked") / "marked.mp4"
    watermark_id = provenance.watermark_id_for("sample-item")
    video.write_video(out, provenance.mark_frames(iter(frames), watermark_id), 25.0,
                      metadata=provenance.metadata_tags())
    ingredients = [provenance.Ingredient("identity", str(source), "0" * 64)]
    definition = provenance.signing.manifest_definition(out.name, "test", ingredients, {}, {}, watermark_id)
    provenance.sign_mp4(out, definition, ingredients)
    return out, watermark_id, frames


# --- watermark --------------------------------------------------------------------------------

def test_payload_round_trips_and_a_wrong_crc_reads_as_no_id():
    from freetalk_core.provenance import watermark

    bits = watermark.payload_bits("0123456789")
    assert watermark.decode_bits(bits) == (0, "0123456789")
    bits[-1] ^= 1
    assert watermark.decode_bits(bits) == (0, None)
    bits[-1] ^= 1
    bits[30] ^= 1
    assert watermark.decode_bits(bits) == (0, None)
    bits[0] ^= 1
    assert watermark.decode_bits(bits)[0] == 1


@pytest.mark.parametrize("transform", ["crf28", "half_size", "first_2s"])
def test_watermark_survives_what_strips_the_manifest(marked_clip, tmp_path, transform):
    from freetalk_core import provenance

    path, watermark_id, _ = marked_clip
    settings = {"crf28": dict(crf=28), "half_size": dict(crf=23, scale=0.5),
                "first_2s": dict(crf=23, seconds=2.0)}[transform]
    copy = _transcode(path, tmp_path / f"{transform}.mp4", **settings)
    result = provenance.verify(copy)
    assert not result.manifest.present
    assert result.detection.found and result.detection.watermark_id == watermark_id
    if transform == "first_2s":
        assert result.detection.frames_used == 50
    assert result.exit_code == 0
    text = provenance.format_verification(result)
    assert "C2PA manifest: absent" in text
    assert "manifest is absent but the watermark is found" in text


def test_marking_changes_frames_little(marked_clip):
    from freetalk_core import provenance

    _, watermark_id, frames = marked_clip
    marked = np.stack(list(provenance.mark_frames(iter(frames[:5]), watermark_id)))
    mse = np.mean((marked.astype(np.float64) - frames[:5]) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 38


def test_no_sample_clip_reads_as_marked(samples_dir):
    from freetalk_core import provenance

    clips = sorted(p for p in samples_dir.iterdir() if p.suffix.lower() in SAMPLE_EXTENSIONS)
    assert len(clips) >= 10
    for clip in clips:
        result = provenance.verify(clip)
        assert result.error is None, clip
        assert not result.detection.found, clip
        assert result.detection.watermark_id is None, clip
        assert not result.manifest.present, clip
        assert result.exit_code == 1, clip


# --- label ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(90, 160), (512, 512), (1920, 1080), (1081, 1919)])
def test_label_sits_in_the_bottom_left_corner_at_any_size(size):
    from freetalk_core.provenance.label import draw_label

    frame = np.full((*size, 3), 128, np.uint8)
    out = draw_label(frame, "AI-generated")
    changed = np.argwhere((out != frame).any(axis=2))
    assert len(changed) > 0
    h, w = size
    assert changed[:, 0].min() > h - max(0.2 * h, 30) and changed[:, 0].max() < h  # text >= 10 px
    assert changed[:, 1].min() < w * 0.1 and changed[:, 1].max() < w * 0.95
    assert (out[changed[:, 0], changed[:, 1]] > 200).any()  # the white text


# --- C2PA -------------------------------------------------------------------------------------

def test_local_signer_is_made_once_and_own_certificate_is_used_from_env(marked_clip, tmp_path, monkeypatch,
                                                                        config_dir):
    import c2pa

    from freetalk_core import provenance
    from freetalk_core.provenance.signing import SigningError

    signer_dir = config_dir / "c2pa-signer"
    chain = (signer_dir / "chain.pem").read_bytes()
    assert b"PRIVATE" in (signer_dir / "key.pem").read_bytes() and oct(os.stat(signer_dir / "key.pem").st_mode)[-3:] == "600"
    path, watermark_id, _ = marked_clip
    other = tmp_path / "other-config"
    monkeypatch.setenv("FREETALK_CONFIG_DIR", str(other))
    monkeypatch.setenv("FREETALK_C2PA_CERT", str(signer_dir / "chain.pem"))
    monkeypatch.setenv("FREETALK_C2PA_KEY", str(signer_dir / "key.pem"))
    copy = tmp_path / "resigned.mp4"
    _transcode(path, copy, crf=23)
    definition = provenance.signing.manifest_definition(copy.name, "test", [], {}, {}, watermark_id)
    provenance.sign_mp4(copy, definition, [])
    assert not other.exists()  # the given certificate was used, no local one was made
    with c2pa.Reader(str(copy)) as reader:
        assert reader.get_validation_state() == "Valid"
        assert reader.get_active_manifest()["signature_info"]["common_name"] == "freetalk local signer"
    assert (signer_dir / "chain.pem").read_bytes() == chain
    monkeypatch.delenv("FREETALK_C2PA_KEY")
    with pytest.raises(SigningError, match="both"):
        provenance.signing.make_signer()


def test_tampered_file_reports_an_invalid_manifest(marked_clip, tmp_path):
    from freetalk_core import provenance

    path, _, _ = marked_clip
    data = bytearray(path.read_bytes())
    mdat = data.index(b"mdat")
    for i in range(mdat + 200, mdat + 260):
        data[i] ^= 0x55
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    report = provenance.read_manifest(tampered)
    assert report.present and not report.valid
    assert report.problems
    assert "INVALID" in provenance.format_verification(provenance.verify(tampered))


def test_verify_cli_exit_codes(marked_clip, tmp_path, samples_dir):
    from flows.cli import app

    path, watermark_id, _ = marked_clip
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    runner = CliRunner()
    marked = runner.invoke(app, ["verify", str(path)])
    assert marked.exit_code == 0, marked.output
    assert f"payload freetalk:{watermark_id}" in marked.output and "present, valid" in marked.output
    plain = runner.invoke(app, ["verify", str(samples_dir / "LipNet__bbaf2n.mpg")])
    assert plain.exit_code == 1 and "watermark: not found" in plain.output
    broken = runner.invoke(app, ["verify", str(path), str(junk)])
    assert broken.exit_code == 2 and "unreadable" in broken.output
    assert broken.output.count("verdict:") == 2


# --- the product: generate marks, signs and records --------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_models, samples_dir):
    from flows.generate import generate_to, make_job
    from flows.runtime import configure_environment, store_settings
    from freetalk_core import video

    folder = tmp_path_factory.mktemp("gen")
    clips = []
    for name in ("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"):
        frames = video.read_video(samples_dir / name, fps=25.0, max_frames=25)
        clips.append(video.write_video(folder / name, iter(frames), 25.0))
    # 1 s of speech (the output lasts as long as the audio): a video file with an audio stream.
    audio = video.write_video(folder / "speech.mp4", iter(frames[:25]), 25.0,
                              audio=samples_dir / "EDTalk__mouth_source.wav")
    job = make_job(*clips, audio=audio, store=folder / "store", models=tiny_models, steps=2,
                   batch_size=4, chunk_frames=10, label="AI-generated")
    configure_environment()
    with store_settings(Path(job.store)):
        out = generate_to(job, folder / "out.mp4")
    return job, out


def test_generated_output_carries_a_valid_manifest_read_independently(generated):
    import c2pa

    job, out = generated
    with c2pa.Reader(str(out)) as reader:
        assert reader.get_validation_state() == "Valid"
        manifest = json.loads(reader.json())
    active = manifest["manifests"][manifest["active_manifest"]]
    actions = next(a for a in active["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    edited = next(a for a in actions if a["action"] == "c2pa.edited")
    assert edited["digitalSourceType"].endswith("/compositeWithTrainedAlgorithmicMedia")
    titles = {i["title"]: i["relationship"] for i in active["ingredients"]}
    assert titles == {Path(job.identity).name: "parentOf", Path(job.lip_ref).name: "inputTo",
                      Path(job.audio).name: "inputTo"}
    generation = next(a for a in active["assertions"] if a["label"] == "org.freetalk.generation")["data"]
    assert {(i["role"], i["sha256"]) for i in generation["inputs"]} == {
        ("identity", job.identity_sha256), ("lip_ref", job.lip_ref_sha256), ("audio", job.audio_sha256)}
    unet = generation["models"]["sd15-inpainting"]
    weights = next(k for k in unet if k.startswith("unet/") and "safetensors" in k)
    assert unet[weights] == hashlib.sha256((Path(job.models) / "sd15-inpainting" / weights).read_bytes()).hexdigest()
    assert generation["parameters"]["steps"] == 2 and generation["parameters"]["label"] == "AI-generated"
    with av.open(str(out)) as container:
        assert "freetalk" in container.metadata.get("comment", "")


def test_store_traces_the_output_by_hash_and_watermark_id(generated, tmp_path):
    from freetalk_core import provenance

    job, out = generated
    item = Store(job.store).item(job.item_id)
    assert item["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert item["watermark_id"] == provenance.watermark_id_for(job.item_id)
    result = provenance.verify(out)
    assert result.manifest.valid and result.manifest.self_issued
    assert result.detection.found and result.detection.watermark_id == item["watermark_id"]
    stripped = provenance.verify(_transcode(out, tmp_path / "crf28.mp4", crf=28))
    assert not stripped.manifest.present and stripped.detection.watermark_id == item["watermark_id"]


def test_marked_output_matches_identity_outside_the_mouth_mask(generated):
    from conftest import outside_mouth_masks

    from freetalk_core import video

    job, out = generated
    identity = video.read_video(job.identity, fps=25.0)
    output = video.read_video(out, fps=25.0)
    for t, ident, outside in outside_mouth_masks(Store(job.store), job.item_id, identity, len(output)):
        outside[int(0.85 * outside.shape[0]):] = False  # the visible label's corner
        err = ((output[t].astype(np.float64) - ident) ** 2)[outside].mean()
        assert 10 * np.log10(255 ** 2 / err) > 35


def test_no_mark_is_recorded_and_leaves_no_watermark(generated):
    from flows.generate import generate_to, make_job
    from flows.runtime import store_settings
    from freetalk_core import provenance

    job, out = generated
    unmarked_job = make_job(job.identity, job.lip_ref, audio=job.audio, store=job.store, models=job.models,
                            item_id=job.item_id, steps=2, batch_size=4, chunk_frames=10, mark=False)
    with store_settings(Path(job.store)):
        unmarked = generate_to(unmarked_job, out.with_name("unmarked.mp4"))
    store = Store(job.store)
    assert store.item(job.item_id)["watermark_id"] is None
    assert store.attrs(job.item_id, arrays.NOISE_FILTER)["marked"] is False
    assert store.metrics(job.item_id)[job.item_id]["watermarked"] == 0.0
    result = provenance.verify(unmarked)
    assert not result.detection.found
    assert result.manifest.valid
    assert result.manifest.generation["parameters"]["watermarked"] is False
