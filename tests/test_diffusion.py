"""Diffusion stage: tiny SD-inpainting + FaceID-Plus checkpoints through the product loader."""

import numpy as np
import pytest
import torch

from freetalk_core import diffusion, models
from freetalk_core.errors import ModelFileError
from freetalk_core.models import layout

SIZE = 512
STEPS = 3
CLIP_HIDDEN = layout.TINY_CLIP_VISION_CONFIG["hidden_size"]


@pytest.fixture(scope="module")
def pipe(tiny_models_anywhere):
    return diffusion.load_pipeline(tiny_models_anywhere)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(7)
    n = 8
    crops = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        masks[i, 260 + 4 * i : 460, 140:380] = 1.0
    structure = rng.standard_normal((n, 257, CLIP_HIDDEN)).astype(np.float32)
    negative = rng.standard_normal((257, CLIP_HIDDEN)).astype(np.float32)
    identity = rng.standard_normal(512).astype(np.float32)
    identity /= np.linalg.norm(identity)
    return dict(crops=crops, masks=masks, structure_embeds=structure, negative_embed=negative, identity_embed=identity)


def _generate(pipe, inputs, frames=slice(None), seed=42, **kwargs):
    kwargs.setdefault("steps", STEPS)
    return diffusion.generate_frames(
        pipe,
        inputs["crops"][frames],
        inputs["masks"][frames],
        inputs["structure_embeds"][frames],
        inputs["negative_embed"],
        inputs["identity_embed"],
        diffusion.initial_noise(seed),
        **kwargs,
    )


def test_pipeline_has_faceid_plus_lora_and_dpm_solver(pipe):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.safety_checker is None
    assert pipe.unet.config.in_channels == 9
    ip_processors = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(ip_processors) == 4  # one per cross-attention layer of the tiny U-Net
    # LoRA on q, k, v, out of all 8 attention layers
    assert len(diffusion.faceid_lora_layers(pipe)) == 32
    assert pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut is False


def test_faceid_lora_changes_the_unet_output(pipe):
    torch.manual_seed(0)
    sample = torch.randn(2, 9, 16, 16)
    context = torch.randn(2, 77, layout.TINY_UNET_CONFIG["cross_attention_dim"])
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = torch.randn(2, 1, 257, CLIP_HIDDEN)
    cond = {"image_embeds": [torch.randn(2, 1, 512)]}
    try:
        with torch.no_grad():
            with_lora = pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample
            pipe.unet.disable_adapters()
            without_lora = pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample
    finally:
        pipe.unet.enable_adapters()
        projection.clip_embeds = None
    assert (with_lora - without_lora).abs().max() > 1e-4


def test_plusv2_turns_the_shortcut_on(tiny_models_anywhere):
    pipe_v2 = diffusion.load_pipeline(tiny_models_anywhere, faceid_variant="plusv2")
    assert pipe_v2.unet.encoder_hid_proj.image_projection_layers[0].shortcut is True


def test_missing_faceid_file_is_a_model_file_error(tmp_path, tiny_models_anywhere, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    broken = tmp_path / "m"
    shutil.copytree(tiny_models_anywhere, broken, symlinks=True)
    models.faceid_path(broken).unlink()
    with pytest.raises(ModelFileError, match="ip-adapter-faceid-plus_sd15.bin"):
        diffusion.load_pipeline(broken)


def test_initial_noise_is_seeded():
    a = diffusion.initial_noise(3)
    assert a.shape == (1, 4, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, diffusion.initial_noise(3))
    assert not torch.equal(a, diffusion.initial_noise(4))
    with pytest.raises(ValueError):
        diffusion.initial_noise(0, height=500)


def test_frame_alone_equals_frame_inside_a_batch_of_8(pipe, inputs):
    batch = _generate(pipe, inputs, output_type="float")
    assert batch.shape == (8, SIZE, SIZE, 3) and batch.dtype == np.float32
    # frames differ from each other (own crop, mask and structure embedding each)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2
    for i in (0, 5):
        alone = _generate(pipe, inputs, frames=slice(i, i + 1), output_type="float")
        assert np.abs(alone[0] - batch[i]).max() <= 1e-4


def test_same_seed_is_bit_identical_and_seed_matters(pipe, inputs):
    first = _generate(pipe, inputs, frames=slice(0, 2))
    second = _generate(pipe, inputs, frames=slice(0, 2))
    assert first.dtype == np.uint8 and first.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(first, second)
    other = _generate(pipe, inputs, frames=slice(0, 2), seed=43)
    assert not np.array_equal(first, other)


def test_structure_embedding_reaches_the_unet_through_the_ip_adapter(pipe, inputs):
    changed = dict(inputs, structure_embeds=inputs["structure_embeds"][::-1].copy())
    base = _generate(pipe, inputs, frames=slice(0, 1), output_type="float")
    other = _generate(pipe, changed, frames=slice(0, 1), output_type="float")
    assert np.abs(base - other).max() > 1e-3
    # with the image prompt switched off, the structure embedding has no effect
    base0 = _generate(pipe, inputs, frames=slice(0, 1), output_type="float", ip_scale=0.0)
    other0 = _generate(pipe, changed, frames=slice(0, 1), output_type="float", ip_scale=0.0)
    assert np.abs(base0 - other0).max() == 0.0


def test_negative_embedding_is_used_only_with_guidance(pipe, inputs):
    changed = dict(inputs, negative_embed=inputs["negative_embed"] * 0.0)
    guided = [_generate(pipe, x, frames=slice(0, 1), output_type="float") for x in (inputs, changed)]
    assert np.abs(guided[0] - guided[1]).max() > 1e-3
    plain = [_generate(pipe, x, frames=slice(0, 1), output_type="float", guidance=1.0) for x in (inputs, changed)]
    assert np.abs(plain[0] - plain[1]).max() == 0.0


def test_guidance_puts_negatives_first(pipe, inputs):
    """The image-prompt projection sees [negatives of every frame, then each frame's own
    prompt], the order in which the pipeline stacks its unconditional and conditional batch."""
    seen = []
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    hook = projection.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].clone(), module.clip_embeds.clone()))
    )
    try:
        _generate(pipe, inputs, frames=slice(0, 3), steps=1)
    finally:
        hook.remove()
    id_embeds, clip_embeds = seen[0]
    assert id_embeds.shape == (6, 512) and clip_embeds.shape == (6, 1, 257, CLIP_HIDDEN)
    assert torch.all(id_embeds[:3] == 0)
    assert torch.equal(id_embeds[3:], torch.from_numpy(inputs["identity_embed"]).expand(3, -1))
    assert torch.equal(clip_embeds[:3, 0], torch.from_numpy(inputs["negative_embed"]).expand(3, -1, -1))
    assert torch.equal(clip_embeds[3:, 0], torch.from_numpy(inputs["structure_embeds"][:3]))


def test_bad_inputs_are_rejected(pipe, inputs):
    with pytest.raises(ValueError, match="masks"):
        diffusion.generate_frames(pipe, inputs["crops"][:2], inputs["masks"][:1], inputs["structure_embeds"][:2],
                                  inputs["negative_embed"], inputs["identity_embed"], diffusion.initial_noise(0))
    with pytest.raises(ValueError, match="noise"):
        diffusion.generate_frames(pipe, inputs["crops"][:1], inputs["masks"][:1], inputs["structure_embeds"][:1],
                                  inputs["negative_embed"], inputs["identity_embed"],
                                  diffusion.initial_noise(0, 256, 256))


def test_fused_lora_and_channels_last_keep_the_result(tiny_models_anywhere, inputs):
    fresh = diffusion.load_pipeline(tiny_models_anywhere)
    before = _generate(fresh, inputs, frames=slice(0, 2), output_type="float", steps=2)
    diffusion.optimize_pipeline(fresh, channels_last=True, vae_slicing=True)
    assert diffusion.faceid_lora_layers(fresh) == []  # folded into the attention weights
    after = _generate(fresh, inputs, frames=slice(0, 2), output_type="float", steps=2)
    assert np.abs(before - after).max() <= 1e-4


def test_out_of_memory_halves_the_batch_and_keeps_every_frame(pipe, inputs, monkeypatch):
    real = diffusion.generate_frames
    sizes = []

    def limited(pipe, crops, *args, **kwargs):
        sizes.append(len(crops))
        if len(crops) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(pipe, crops, *args, **kwargs)

    monkeypatch.setattr(diffusion, "generate_frames", limited)
    n = 5
    progress = []
    out = diffusion.generate_in_batches(
        pipe, inputs["crops"][:n], inputs["masks"][:n], inputs["structure_embeds"][:n], inputs["negative_embed"],
        inputs["identity_embed"], diffusion.initial_noise(42), batch_size=4, steps=2, output_type="float",
        on_batch=lambda done, total: progress.append(done),
    )
    assert sizes == [4, 2, 2, 1]
    assert progress == [2, 4, 5]
    assert out.shape == (n, SIZE, SIZE, 3)
    direct = real(pipe, inputs["crops"][:n], inputs["masks"][:n], inputs["structure_embeds"][:n],
                  inputs["negative_embed"], inputs["identity_embed"], diffusion.initial_noise(42), steps=2,
                  output_type="float")
    assert np.abs(out - direct).max() <= 1e-4


def test_throughput_bench_runs_on_tiny_models(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    monkeypatch.delenv("FREETALK_EOS_DIR", raising=False)
    path = Path(__file__).resolve().parents[1] / "bench" / "diffusion_throughput.py"
    spec = importlib.util.spec_from_file_location("diffusion_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--frames", "2", "--steps", "2", "--baseline-frames", "1",
                         "--json", str(out)])
    assert result["size"] == "tiny" and json.loads(out.read_text())["frames"] == 2
    assert result["freetalk"]["frames_per_s"] > 0 and result["baseline"]["frames_per_s"] > 0
    assert result["freetalk"]["tflop_per_frame"] > 0


GPU_WEIGHTS_BUDGET = 3 * 2**30
GPU_FRAME_BUDGET = 2**30
"""What `diffusion.default_batch_size` allows on a GPU: 3 GiB for the weights, 1 GiB per frame."""


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_full_size_pipeline_on_gpu_stays_within_the_batch_size_rule(tmp_path):
    """The real-size pipeline (random weights) at the product's precision and settings: the
    weights and a batch of 4 frames at 512 x 512 with guidance fit the memory that
    `default_batch_size` plans for, so a batch it picks from free memory does not run out."""
    from freetalk_core.models.tiny import full_size_random_pipeline

    device = "cuda"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    pipe, clip_hidden = full_size_random_pipeline(device, diffusion.default_dtype(device), tmp_path)
    pipe = diffusion.optimize_pipeline(pipe)
    weights = torch.cuda.memory_allocated() - start
    assert weights <= GPU_WEIGHTS_BUDGET, f"weights take {weights / 2**30:.2f} GiB"
    torch.cuda.reset_peak_memory_stats()
    rng = np.random.default_rng(0)
    n = 4
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    masks[:, 280:470, 130:382] = 1.0
    frames = diffusion.generate_in_batches(
        pipe, rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), masks,
        rng.standard_normal((n, 257, clip_hidden)).astype(np.float32),
        rng.standard_normal((257, clip_hidden)).astype(np.float32),
        rng.standard_normal(512).astype(np.float32), diffusion.initial_noise(42),
        batch_size=n, steps=2)
    peak = torch.cuda.max_memory_allocated() - start
    assert frames.shape == (n, SIZE, SIZE, 3) and frames.dtype == np.uint8
    budget = GPU_WEIGHTS_BUDGET + n * GPU_FRAME_BUDGET
    assert peak <= budget, f"peak {peak / 2**30:.2f} GiB over the {budget / 2**30:.0f} GiB budget"
