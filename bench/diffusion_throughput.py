"""Diffusion throughput: frames/s, counted TFLOP/s and MFU, peak memory; stock pipeline baseline.

    .venv/bin/python bench/diffusion_throughput.py                    # tiny models on CPU, full size on a GPU
    .venv/bin/python bench/diffusion_throughput.py --size full --frames 64 --compile --json out.json

"full" is the SD 1.5 inpainting architecture with IP-Adapter-FaceID-Plus at real size with random
weights (the same FLOPs as the real checkpoints); "tiny" is `freetalk models tiny`. Both run the
paper's settings: 512 x 512, 20 DPM-Solver++ steps, guidance 7.5, at the product's precision
(`diffusion.default_dtype`: float16 on CUDA, float32 on the CPU) unless `--dtype` says otherwise.
The baseline calls the stock diffusers inpainting pipeline clip by clip (5 frames per call), as
its documentation shows for FaceID-Plus, on the same weights. Each configuration runs in its own
process (so each peak memory is its own); FLOPs are counted on the product's pipeline as it
runs, the FaceID LoRA fused.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freetalk_core import diffusion, models  # noqa: E402
from freetalk_core.errors import ModelFileError  # noqa: E402
from freetalk_core.models import layout, tiny  # noqa: E402

PEAK_DENSE_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
"""Vendor peak dense fp16/bf16 tensor TFLOP/s by device name fragment, first match wins."""

BASELINE_CLIP = 5


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """The product pipeline (`attach_faceid`) on tiny checkpoints or full-size random weights."""
    if size == "tiny":
        try:
            models.write_tiny_models(workdir / "models")
        except ModelFileError:
            pass  # the eos files are not needed here; everything else was written
        pipe = diffusion.load_pipeline(workdir / "models", device=device, dtype=dtype)
        return pipe, layout.TINY_CLIP_VISION_CONFIG["hidden_size"]

    return tiny.full_size_random_pipeline(device, dtype, workdir)


def make_inputs(n: int, clip_hidden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)
    masks = np.zeros((n, 512, 512), np.float32)
    masks[:, 280:470, 130:382] = 1.0
    structure = rng.standard_normal((n, 257, clip_hidden)).astype(np.float32)
    negative = rng.standard_normal((257, clip_hidden)).astype(np.float32)
    identity = rng.standard_normal(512).astype(np.float32)
    return crops, masks, structure, negative, identity / np.linalg.norm(identity)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def count_flops_per_frame(pipe, inputs, noise, steps: int, guidance: float) -> float:
    """FLOPs of generating one frame, counted op by op (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    crops, masks, structure, negative, identity = inputs
    counter = FlopCounterMode(display=False)
    with counter:
        diffusion.generate_frames(pipe, crops[:1], masks[:1], structure[:1], negative, identity, noise,
                                  steps=steps, guidance=guidance)
    return float(counter.get_total_flops())


def stock_pipeline_run(pipe, inputs, noise, steps: int, guidance: float, seed: int) -> None:
    """The stock diffusers call for IP-Adapter-FaceID-Plus, one 5-frame clip per call."""
    from PIL import Image

    crops, masks, structure, negative, identity = inputs
    device, dtype = pipe.unet.device, pipe.unet.dtype
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    id_embeds = torch.cat([torch.zeros(1, 1, 512), torch.from_numpy(identity)[None, None]]).to(device, dtype)
    for start in range(0, len(crops), BASELINE_CLIP):
        stop = min(len(crops), start + BASELINE_CLIP)
        n = stop - start
        clip = torch.from_numpy(structure[start:stop])[:, None]
        neg = torch.from_numpy(negative).expand(n, 1, *negative.shape)
        projection.clip_embeds = torch.cat([neg, clip]).to(device, dtype)
        pipe(
            prompt=[""] * n,
            image=[Image.fromarray(c) for c in crops[start:stop]],
            mask_image=[Image.fromarray((m * 255).astype(np.uint8)) for m in masks[start:stop]],
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.to(device, dtype).expand(n, -1, -1, -1),
            ip_adapter_image_embeds=[id_embeds],
            generator=torch.Generator(device).manual_seed(seed),
            output_type="np",
        )
    projection.clip_embeds = None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--size", default="auto", choices=["auto", "tiny", "full"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--frames", type=int, default=None, help="frames to generate (default 40 GPU, 8 CPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=diffusion.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=diffusion.DEFAULT_GUIDANCE)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--baseline-frames", type=int, default=None, help="frames for the stock baseline (default = --frames)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", choices=["baseline", "freetalk"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only is None:
        return _compare(argv if argv is not None else sys.argv[1:], args)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "tiny")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else diffusion.default_dtype(device)
    frames = args.frames or (40 if device.type == "cuda" else 8)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {"device": device_name, "size": size, "dtype": str(dtype).removeprefix("torch."), "steps": args.steps,
              "guidance": args.guidance, "frames": frames}
    with tempfile.TemporaryDirectory() as tmp:
        pipe, clip_hidden = build_pipeline(size, device, dtype, Path(tmp))
    noise = diffusion.initial_noise(42)

    if args.only == "baseline":
        n_base = args.baseline_frames or frames
        base_inputs = make_inputs(n_base, clip_hidden, seed=1)
        stock_pipeline_run(pipe, tuple(x[:1] if getattr(x, "ndim", 0) >= 3 else x for x in base_inputs), noise,
                           2, args.guidance, 0)  # warm-up
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        stock_pipeline_run(pipe, base_inputs, noise, args.steps, args.guidance, 0)
        sync(device)
        seconds = time.perf_counter() - t0
        result["baseline"] = {"frames": n_base, "seconds": seconds, "frames_per_s": n_base / seconds,
                              "peak_memory_gb": peak_memory_gb(device), "clip_frames": BASELINE_CLIP}
    else:
        inputs = make_inputs(frames, clip_hidden)
        diffusion.optimize_pipeline(pipe)
        flops = count_flops_per_frame(pipe, inputs, noise, args.steps, args.guidance)
        if args.compile:
            diffusion.optimize_pipeline(pipe, compile_unet=True)
        batch = args.batch_size or diffusion.default_batch_size(device)
        crops, masks, structure, negative, identity = inputs
        warm = min(batch, frames)
        diffusion.generate_in_batches(pipe, crops[:warm], masks[:warm], structure[:warm], negative, identity, noise,
                                      batch_size=batch, steps=args.steps if args.compile else 2, guidance=args.guidance)
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        diffusion.generate_in_batches(pipe, crops, masks, structure, negative, identity, noise, batch_size=batch,
                                      steps=args.steps, guidance=args.guidance)
        sync(device)
        seconds = time.perf_counter() - t0
        fps = frames / seconds
        achieved = flops * fps / 1e12
        peak = next((v for k, v in PEAK_DENSE_TFLOPS.items() if k in device_name), None) if device.type == "cuda" else None
        result["freetalk"] = {"frames": frames, "batch_size": batch, "seconds": seconds, "frames_per_s": fps,
                              "tflop_per_frame": flops / 1e12, "achieved_tflops": achieved,
                              "mfu": achieved / peak if peak else None, "peak_memory_gb": peak_memory_gb(device),
                              "compiled": args.compile}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _compare(argv: list[str], args) -> dict:
    """Each configuration in a child process of its own; their results side by side."""
    result: dict = {}
    clean = [a for i, a in enumerate(argv) if not (a == "--json" or a.startswith("--json=")
                                                    or (i and argv[i - 1] == "--json"))]
    with tempfile.TemporaryDirectory() as tmp:
        for only in ([] if args.no_baseline else ["baseline"]) + ["freetalk"]:
            out = Path(tmp) / f"{only}.json"
            subprocess.run([sys.executable, __file__, *clean, "--only", only, "--json", str(out)], check=True)
            result.update(json.loads(out.read_text()))
    print(f"device: {result['device']}; models: {result['size']}; dtype: {result['dtype']}; "
          f"512x512, {result['steps']} steps, guidance {result['guidance']}")
    if "baseline" in result:
        b = result["baseline"]
        print(f"stock pipeline ({BASELINE_CLIP}-frame clips, own process): {b['frames_per_s']:.3f} frames/s "
              f"({b['seconds'] / b['frames']:.3f} s/frame), peak memory {b['peak_memory_gb']:.2f} GiB")
    f = result["freetalk"]
    print(f"freetalk (batch {f['batch_size']}, own process): {f['frames_per_s']:.3f} frames/s "
          f"({f['seconds'] / f['frames']:.3f} s/frame); {f['tflop_per_frame']:.3f} TFLOP/frame counted; "
          f"{f['achieved_tflops']:.3f} TFLOP/s achieved"
          + (f"; MFU {f['mfu']:.1%}" if f["mfu"] else "; MFU n/a (no peak figure)")
          + f"; peak memory {f['peak_memory_gb']:.2f} GiB")
    if "baseline" in result:
        result["speedup_vs_stock"] = f["frames_per_s"] / result["baseline"]["frames_per_s"]
        print(f"speed-up over the stock pipeline: {result['speedup_vs_stock']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
