"""Models directory: tiny checkpoints in the real formats, the checker, full-size format fidelity."""

import shutil
from pathlib import Path

import pytest
import torch

from freetalk_core import models
from freetalk_core.errors import ModelFileError
from freetalk_core.models import download, layout


@pytest.fixture(scope="module")
def tiny_dir(tiny_models_anywhere):
    return tiny_models_anywhere


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A private copy of the tiny models directory to break."""
    target = tmp_path / "broken"
    shutil.copytree(tiny_dir, target, symlinks=True)
    return target


def test_tiny_models_check_clean_and_are_small(tiny_dir):
    assert models.check_models(tiny_dir) == []
    assert models.check_models(tiny_dir, faceid_variant="plusv2") == []
    assert all(entry.present for entry in models.describe_models(tiny_dir))
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 40e6


def test_tiny_models_are_reproducible(tiny_dir, tmp_path):
    again = models.write_tiny_models(tmp_path / "again", eos_source=tiny_dir / "eos")
    for rel in ("sd15-inpainting/unet/diffusion_pytorch_model.safetensors", "insightface/w600k_r50.onnx",
                "image_encoder/model.safetensors"):
        assert (again / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel
    a = torch.load(models.faceid_path(again), weights_only=True)
    b = torch.load(models.faceid_path(tiny_dir), weights_only=True)
    assert all(torch.equal(a["ip_adapter"][k], b["ip_adapter"][k]) for k in b["ip_adapter"])


def test_tiny_faceid_file_is_the_original_format(tiny_dir):
    state_dict = torch.load(models.faceid_path(tiny_dir), map_location="cpu", weights_only=True)
    assert set(state_dict) == {"image_proj", "ip_adapter"}
    image_proj = state_dict["image_proj"]
    assert len(image_proj) == 56
    width = layout.TINY_UNET_CONFIG["cross_attention_dim"]
    assert width % 64 == 0
    assert image_proj["proj.0.weight"].shape == (1024, 512)  # id dim 512, as diffusers reads it
    assert image_proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64 == width // 64
    assert image_proj["perceiver_resampler.proj_out.weight"].shape[0] == width
    assert {k.split(".")[2] for k in image_proj if k.startswith("perceiver_resampler.layers.")} == {"0", "1", "2", "3"}
    ip_adapter = state_dict["ip_adapter"]
    # 8 attention processors, LoRA (8 keys) on each, to_k_ip/to_v_ip on the 4 cross-attention ones
    assert len(ip_adapter) == 8 * 8 + 4 * 2
    assert {k for k in ip_adapter if k.endswith("to_k_ip.weight")} == {f"{i}.to_k_ip.weight" for i in (1, 3, 5, 7)}


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: (d / "sd15-inpainting/vae/diffusion_pytorch_model.safetensors").unlink(), "sd15-inpainting/vae/ weights"),
        (lambda d: (d / "sd15-inpainting/unet/config.json").unlink(), "missing sd15-inpainting/unet/config.json"),
        (lambda d: (d / "eos/sfm_shape_3448.bin").unlink(), "missing eos/sfm_shape_3448.bin"),
        (lambda d: (d / "insightface/w600k_r50.onnx").unlink(), "w600k_r50.onnx"),
        (lambda d: (d / "insightface/w600k_r50.onnx").write_bytes(b"not an onnx file"), "unreadable ONNX"),
        (lambda d: _truncate(models.faceid_path(d)), "truncated or corrupt"),
        (lambda d: _truncate(d / "image_encoder/model.safetensors"), "truncated"),
        (lambda d: _reshape_key(d, "ip_adapter", "3.to_k_ip.weight"), "ip_adapter[3.to_k_ip.weight] has shape"),
        (lambda d: _reshape_key(d, "image_proj", "perceiver_resampler.proj_in.weight"), "proj_in.weight] has shape"),
        (lambda d: _drop_key(d, "ip_adapter", "5.to_q_lora.up.weight"), "ip_adapter lacks 1 key(s), e.g. 5.to_q_lora.up.weight"),
    ],
    ids=["missing-vae-weights", "missing-unet-config", "missing-eos", "missing-onnx", "bad-onnx", "truncated-bin",
         "truncated-safetensors", "wrong-shape-ip", "wrong-shape-proj", "missing-key"],
)
def test_each_problem_gives_one_clear_line(broken, break_it, expected):
    break_it(broken)
    problems = models.check_models(broken)
    assert len(problems) == 1, problems
    assert expected in problems[0]
    assert "\n" not in problems[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite(directory, change):
    path = models.faceid_path(directory)
    state_dict = torch.load(path, weights_only=True)
    change(state_dict)
    torch.save(state_dict, path)


def _reshape_key(directory, part, key):
    def change(sd):
        sd[part][key] = torch.zeros(sd[part][key].shape[0], sd[part][key].shape[1] + 1)
    _rewrite(directory, change)


def _drop_key(directory, part, key):
    _rewrite(directory, lambda sd: sd[part].pop(key))


def test_non_inpainting_unet_is_reported(broken):
    import json

    config_path = broken / "sd15-inpainting/unet/config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 4
    config_path.write_text(json.dumps(config))
    problems = models.check_models(broken)
    assert any("input channels" in p for p in problems)


def test_missing_directory_and_resolve(tmp_path, monkeypatch):
    assert models.check_models(tmp_path / "nope")[0].startswith("models directory")
    monkeypatch.setenv("FREETALK_MODELS", str(tmp_path))
    assert models.resolve_models_dir(None) == tmp_path.resolve()
    assert models.resolve_models_dir(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.delenv("FREETALK_MODELS")
    with pytest.raises(ModelFileError, match="FREETALK_MODELS"):
        models.resolve_models_dir(None)


def test_eos_source_is_required(tmp_path, monkeypatch):
    monkeypatch.delenv("FREETALK_EOS_DIR", raising=False)
    with pytest.raises(ModelFileError, match="FREETALK_EOS_DIR"):
        models.write_tiny_models(tmp_path / "m")
    # everything else was written
    assert models.faceid_path(tmp_path / "m").is_file()
    assert models.check_models(tmp_path / "m") and all("eos/" in p for p in models.check_models(tmp_path / "m"))


def test_tiny_models_load_through_the_real_loaders(tiny_dir):
    import insightface
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "sd15-inpainting/unet")
    assert unet.config.in_channels == 9
    vae = AutoencoderKL.from_pretrained(tiny_dir / "sd15-inpainting/vae")
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    tokens = CLIPTokenizer.from_pretrained(tiny_dir / "sd15-inpainting/tokenizer")("", padding="max_length",
                                                                                    max_length=77).input_ids
    assert len(tokens) == 77
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "image_encoder")
    hidden = encoder(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 257, layout.TINY_CLIP_VISION_CONFIG["hidden_size"])
    arcface = insightface.model_zoo.get_model(str(tiny_dir / "insightface/w600k_r50.onnx"),
                                              providers=["CPUExecutionProvider"])
    assert arcface.taskname == "recognition" and arcface.input_size == (112, 112)


# --- full-size format fidelity, on the meta device (no memory, no weights) ---------------------


@pytest.fixture(scope="module")
def full_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(layout.SD15_UNET_CONFIG)


def test_full_size_unet_is_sd15_inpainting(full_unet):
    n_params = sum(p.numel() for p in full_unet.parameters())
    assert round(n_params / 1e6, 1) == 859.5
    assert full_unet.conv_in.in_channels == 9


def test_full_size_faceid_plus_key_set_loads_strictly(full_unet):
    """The real file's key set and shapes (56 + 288 keys) go through diffusers' own converters
    with strict loading into the full-size U-Net's IP-Adapter modules."""
    image_proj_shapes = layout.faceid_image_proj_shapes(768, layout.CLIP_VIT_H_CONFIG["hidden_size"])
    ip_adapter_shapes = layout.faceid_ip_adapter_shapes(layout.SD15_UNET_CONFIG)
    assert len(image_proj_shapes) == 56 and len(ip_adapter_shapes) == 288
    state_dict = {
        "image_proj": {k: torch.empty(s) for k, s in image_proj_shapes.items()},
        "ip_adapter": {k: torch.empty(s) for k, s in ip_adapter_shapes.items()},
    }
    projection = full_unet._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"], low_cpu_mem_usage=False)
    assert type(projection).__name__ == "IPAdapterFaceIDPlusImageProjection"
    processors = full_unet._convert_ip_adapter_attn_to_diffusers([state_dict], low_cpu_mem_usage=False)
    assert sum(hasattr(p, "to_k_ip") for p in processors.values()) == 16
    # every LoRA tensor lands on an existing linear layer of matching width
    loras = full_unet._load_ip_adapter_loras([state_dict])[0]
    assert len(loras) == 256
    modules = dict(full_unet.named_modules())
    for key, value in loras.items():
        name, proj, part = key.removeprefix("unet.").rsplit(".", 3)[0], key.split(".")[-3], key.split(".")[-2]
        layer = modules[name.removesuffix(".processor") + "." + proj.replace("_lora", "").replace("to_out", "to_out.0")]
        if part == "down":
            assert value.shape[1] == layer.in_features, key
        else:
            assert value.shape[0] == layer.out_features, key
    assert layout.check_faceid_state_dict(state_dict, layout.SD15_UNET_CONFIG, 1280, "real") == []


def test_full_size_clip_vit_h_hidden_states_are_257_by_1280():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**layout.CLIP_VIT_H_CONFIG)
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(config)
        hidden = encoder(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 257, 1280)
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6) == 632  # model.safetensors of h94/IP-Adapter image_encoder: 2.53 GB fp32


# --- download, against a fake hub (no network here) ---------------------------------------------


class _FakeHub:
    """Stands in for the Hugging Face hub: files with their sizes, sha256 (LFS) or git blob ids.
    It serves the tiny checkpoints (the real on-disk formats), so a download passes the checks."""

    def __init__(self, tiny_dir):
        import hashlib

        self.files = {}
        self.served = {}  # what the fake hub actually sends, where it differs from `files`
        self.downloads = []
        names = [(layout.SD15_REPO, f.format(variant=""), tiny_dir / layout.SD15_DIR / f.format(variant=""))
                 for f in download.SD15_FILES]
        names += [(layout.IMAGE_ENCODER_REPO, f"{layout.IMAGE_ENCODER_SUBFOLDER}/{f}",
                   tiny_dir / layout.IMAGE_ENCODER_DIR / f) for f in download.IMAGE_ENCODER_FILES]
        names += [(layout.FACEID_REPO, f, models.faceid_path(tiny_dir, v)) for v, f in layout.FACEID_FILES.items()]
        for repo, name, source in names:
            self.files[(repo, name)] = source.read_bytes()
        self._hashlib = hashlib

    def info(self, repo, name):
        from types import SimpleNamespace

        data = self.files[(repo, name)]
        lfs = None
        if name.endswith((".safetensors", ".bin")):
            lfs = SimpleNamespace(sha256=self._hashlib.sha256(data).hexdigest())
        blob = self._hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        return SimpleNamespace(size=len(data), blob_id=blob, lfs=lfs)

    def api(self):
        from types import SimpleNamespace

        hub = self

        class Api:
            def model_info(self, repo, revision=None):
                return SimpleNamespace(sha="0123456789" * 4)

            def get_paths_info(self, repo, paths, revision=None):
                return [hub.info(repo, p) for p in paths]

        return Api

    def hf_hub_download(self, repo, filename, revision=None, local_dir=None):
        self.downloads.append(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.served.get((repo, filename), self.files[(repo, filename)]))
        return str(path)


@pytest.fixture
def fake_hub(monkeypatch, tiny_dir):
    import io
    import zipfile

    import huggingface_hub

    hub = _FakeHub(tiny_dir)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tiny_dir / "insightface/w600k_r50.onnx", "buffalo_l/w600k_r50.onnx")

    class Response(io.BytesIO):
        status = 200

    def urlopen(request, timeout=None):
        hub.downloads.append(request.full_url)
        return Response(archive.getvalue())

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return hub


def test_download_places_and_verifies_every_file(fake_hub, tmp_path, tiny_dir):
    import json

    target = tmp_path / "real"
    log = []
    models.download_models(target, eos_source=tiny_dir / "eos", log=log.append)
    unet = "sd15-inpainting/unet/diffusion_pytorch_model.safetensors"
    assert (target / unet).read_bytes() == (tiny_dir / unet).read_bytes()
    assert models.check_models(target) == []
    assert (target / "image_encoder/model.safetensors").is_file()
    assert (target / "image_encoder/preprocessor_config.json").is_file()
    assert models.faceid_path(target, "plusv2").is_file()
    assert (target / "insightface/w600k_r50.onnx").read_bytes() == (tiny_dir / "insightface/w600k_r50.onnx").read_bytes()
    assert not (target / ".download").exists()
    manifest = json.loads((target / "manifest.json").read_text())
    assert set(manifest["commits"]) == {layout.SD15_REPO, layout.FACEID_REPO, layout.IMAGE_ENCODER_REPO}
    assert all(len(record["sha256"]) == 64 for record in manifest["files"])
    # a second run finds everything verified and downloads nothing
    fake_hub.downloads.clear()
    models.download_models(target, eos_source=tiny_dir / "eos", log=log.append)
    assert fake_hub.downloads == []


def test_download_fails_when_a_downloaded_model_does_not_pass_its_checks(fake_hub, tmp_path, tiny_dir):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    key = (layout.SD15_REPO, "unet/config.json")
    config = json.loads(fake_hub.files[key])
    fake_hub.files[key] = json.dumps({**config, "in_channels": 4}).encode()  # a text-to-image U-Net
    with pytest.raises(ModelFileError, match="1 check failed: .*9"):
        models.download_models(tmp_path / "real", eos_source=tiny_dir / "eos", log=lambda line: None)
    result = CliRunner().invoke(app, ["models", "download", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "input channels" in result.output


def test_download_rejects_a_corrupt_file(fake_hub, tmp_path):
    key = (layout.FACEID_REPO, layout.FACEID_FILES["plus"])
    fake_hub.served[key] = b"X" * len(fake_hub.files[key])  # right size, wrong content
    with pytest.raises(ModelFileError, match="sha256"):
        models.download_models(tmp_path / "real", log=lambda line: None)
    assert not models.faceid_path(tmp_path / "real").exists()
