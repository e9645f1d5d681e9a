import numpy as np
import pytest

from freetalk_core import noise_sensor
from freetalk_core.noise_sensor import (
    chunk_context,
    ideal_flow,
    mean_noise_pattern,
    noise_pattern,
    noise_pattern_heatmap,
    noise_pattern_sequence,
    noise_variance,
    temporal_filter,
    temporal_filter_chunk,
)


def _synthetic_flows(n=10_000, a=(1.7, -0.6), b=(3.0, -2.0), noise_std=(0.8, 1.3), seed=0):
    """g = a*r + b + n per component, on a 1x1 image: n flow samples of one pixel."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 2.0, size=(n, 1, 1, 2))
    noise = rng.normal(0.0, 1.0, size=(n, 1, 1, 2)) * np.asarray(noise_std)
    g = np.asarray(a) * r + np.asarray(b) + noise
    return g.astype(np.float32), r.astype(np.float32), noise


def test_theorem1_recovers_noise_variance_within_5_percent():
    g, r, noise = _synthetic_flows()
    est = noise_variance(g, r)[0, 0]
    true = noise.reshape(-1, 2).var(axis=0)
    np.testing.assert_allclose(est, true, rtol=0.05)
    # and against the generating variances 0.8^2, 1.3^2
    np.testing.assert_allclose(est, [0.64, 1.69], rtol=0.05)
    pattern = noise_pattern(g, r)
    assert pattern.shape == (1, 1) and pattern.dtype == np.float32
    assert pattern[0, 0] == pytest.approx(np.hypot(*true), rel=0.05)


def test_theorem1_per_pixel_on_an_image():
    # 10,000 frames of a 3x4 image; the noise level differs per pixel and per component
    rng = np.random.default_rng(1)
    n, h, w = 10_000, 3, 4
    r = rng.normal(0.0, 1.5, size=(n, h, w, 2))
    a = rng.uniform(-2, 2, size=(h, w, 2))
    b = rng.uniform(-5, 5, size=(h, w, 2))
    std = rng.uniform(0.1, 2.0, size=(h, w, 2))
    noise = rng.normal(size=(n, h, w, 2)) * std
    g = a * r + b + noise
    est = noise_variance(g.astype(np.float32), r.astype(np.float32))
    np.testing.assert_allclose(est, noise.var(axis=0), rtol=0.05)


def test_no_noise_gives_zero_pattern():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(50, 4, 4, 2)).astype(np.float32)
    assert noise_pattern(2.0 * r + 1.0, r).max() < 1e-4


def test_static_reference_guard_counts_all_generated_variance_as_noise():
    rng = np.random.default_rng(3)
    g = rng.normal(0.0, 0.5, size=(2000, 2, 2, 2)).astype(np.float32)
    r = np.zeros_like(g)
    est = noise_variance(g, r)
    assert np.all(np.isfinite(est))
    np.testing.assert_allclose(est, g.var(axis=0), rtol=1e-4)


def test_flow_only_inside_a_box_gives_pattern_only_there():
    rng = np.random.default_rng(9)
    g_box = rng.normal(size=(30, 5, 6, 2)).astype(np.float32)
    r_box = rng.normal(size=(30, 5, 6, 2)).astype(np.float32)
    g = np.zeros((30, 20, 24, 2), np.float32)
    r = np.zeros_like(g)
    g[:, 7:12, 10:16] = g_box
    r[:, 7:12, 10:16] = r_box
    pattern = noise_pattern(g, r)
    np.testing.assert_array_equal(pattern[7:12, 10:16], noise_pattern(g_box, r_box))
    pattern[7:12, 10:16] = 0
    assert not pattern.any()
    seq = noise_pattern_sequence(g, r, 6)
    np.testing.assert_array_equal(seq[:, 7:12, 10:16], noise_pattern_sequence(g_box, r_box, 6))
    assert not noise_pattern(np.zeros_like(g), np.zeros_like(r)).any()
    assert not noise_pattern_sequence(np.zeros_like(g), np.zeros_like(r), 4).any()


def test_pattern_is_never_negative():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(5, 8, 8, 2)).astype(np.float32)
    assert noise_pattern(r, r).min() >= 0.0


def test_shape_errors_name_the_argument():
    g = np.zeros((4, 5, 5, 2), np.float32)
    with pytest.raises(ValueError, match="reference_flow"):
        noise_pattern(g, g[:, :4])
    with pytest.raises(ValueError, match="generated_flow"):
        noise_pattern(g[..., 0], g[..., 0])


def test_sequence_matches_direct_window_statistics_and_is_local():
    rng = np.random.default_rng(5)
    n_flows, window = 40, 8
    r = rng.normal(size=(n_flows, 3, 3, 2))
    noise_std = np.where(np.arange(n_flows) < 20, 0.1, 2.0)[:, None, None, None]
    g = 1.5 * r + 10.0 + rng.normal(size=r.shape) * noise_std
    seq = noise_pattern_sequence(g.astype(np.float32), r.astype(np.float32), window)
    assert seq.shape == (n_flows + 1, 3, 3) and seq.dtype == np.float32
    for t in (0, 3, 17, 25, n_flows):
        lo = min(max(t - window // 2, 0), n_flows - window)
        direct = noise_pattern(g[lo:lo + window].astype(np.float32), r[lo:lo + window].astype(np.float32))
        np.testing.assert_allclose(seq[t], direct, rtol=1e-4, atol=1e-6)
    # the noisy second half is seen locally, not smeared over the clip
    assert seq[35].mean() > 20 * seq[5].mean()
    # a window covering the clip is the whole-clip pattern for every frame
    whole = noise_pattern_sequence(g.astype(np.float32), r.astype(np.float32), 1000)
    np.testing.assert_allclose(whole, np.broadcast_to(noise_pattern(g, r), whole.shape),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(noise_pattern(g, r, window=window), seq.mean(axis=0), rtol=1e-6)


def _random_clip(t=12, h=20, w=24, seed=6):
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def test_filter_zero_sigma_is_identity():
    frames = _random_clip()
    out = temporal_filter(frames, np.zeros(frames.shape[1:3], np.float32))
    assert out.dtype == np.uint8 and out.shape == frames.shape
    np.testing.assert_array_equal(out, frames)


def test_filter_weights_hand_computed_with_edge_replication():
    frames = np.zeros((6, 1, 1, 3), np.uint8)
    frames[:, 0, 0, 0] = [0, 10, 20, 30, 40, 200]
    sigma = np.ones((1, 1), np.float32)
    w = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    w /= w.sum()
    out = temporal_filter(frames, sigma, kernel_size=5)[:, 0, 0, 0]
    v = frames[:, 0, 0, 0].astype(float)
    padded = np.concatenate([[v[0]] * 2, v, [v[-1]] * 2])  # edge replication, never wrap
    expected = np.rint([np.dot(w, padded[t:t + 5]) for t in range(6)])
    np.testing.assert_array_equal(out, expected)
    # no wrap-around: the first frame does not see the last frame's 200
    assert out[0] < 10


def test_filter_large_sigma_approaches_box_average():
    frames = np.zeros((5, 1, 1, 3), np.uint8)
    frames[:, 0, 0, :] = np.array([0, 50, 100, 150, 200])[:, None]
    out = temporal_filter(frames, np.full((1, 1), 1e4, np.float32), kernel_size=3)
    # kernel 3 with a flat Gaussian: mean of (t-1, t, t+1), ends replicated
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.rint([50 / 3, 50, 100, 150, 550 / 3]))


def test_filter_mask_zero_pixels_are_bit_exact_and_mask_blends():
    frames = _random_clip()
    sigma = np.full(frames.shape[1:3], 2.0, np.float32)
    mask = np.zeros(frames.shape[1:3], np.float32)
    mask[5:15, 6:18] = 1.0
    mask[8:12, 2:6] = 0.5
    out = temporal_filter(frames, sigma, mask=mask)
    full = temporal_filter(frames, sigma)
    np.testing.assert_array_equal(out[:, mask == 0], frames[:, mask == 0])
    np.testing.assert_array_equal(out[:, mask == 1], full[:, mask == 1])
    half = mask == 0.5
    expected = np.rint(frames[:, half] + 0.5 * (full[:, half].astype(float) - frames[:, half]))
    assert np.abs(out[:, half].astype(int) - expected).max() <= 1
    assert (out[:, mask == 1] != frames[:, mask == 1]).mean() > 0.9


def test_filter_accepts_per_frame_pattern_and_mask():
    frames = _random_clip()
    t = frames.shape[0]
    sigma = np.zeros((t,) + frames.shape[1:3], np.float32)
    sigma[4] = 1.5
    mask = np.ones((t,) + frames.shape[1:3], np.float32)
    mask[4, :, :10] = 0.0
    out = temporal_filter(frames, sigma, mask=mask)
    changed = np.any(out != frames, axis=(2, 3))
    assert changed[4].any() and not changed[np.arange(t) != 4].any()
    np.testing.assert_array_equal(out[4, :, :10], frames[4, :, :10])
    with pytest.raises(ValueError, match="noise_pattern"):
        temporal_filter(frames, sigma[:3])
    with pytest.raises(ValueError, match="kernel_size"):
        temporal_filter(frames, sigma, kernel_size=4)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
@pytest.mark.parametrize("per_frame", [False, True])
def test_chunked_filtering_equals_whole_clip_exactly(kernel_size, per_frame):
    rng = np.random.default_rng(7)
    frames = _random_clip(t=23, h=16, w=18, seed=8)
    n = frames.shape[0]
    shape = (n,) + frames.shape[1:3] if per_frame else frames.shape[1:3]
    sigma = rng.uniform(0.0, 3.0, size=shape).astype(np.float32)
    mask = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    mask[mask < 0.3] = 0.0
    # in place, and along the motion (a chunk then reads its context frames' flows too)
    motion = rng.normal(0.0, 1.5, size=(n - 1,) + frames.shape[1:3] + (2,)).astype(np.float32)
    for flows in (None, motion):
        whole = temporal_filter(frames, sigma, kernel_size, mask, motion=flows)
        pieces = []
        for start in range(0, n, 5):
            stop = min(n, start + 5)
            lo, hi = chunk_context(start, stop, n, kernel_size)
            s = sigma[start:stop] if per_frame else sigma
            m = mask[start:stop] if per_frame else mask
            pieces.append(temporal_filter_chunk(frames[lo:hi], s, start, stop, n, kernel_size, m,
                                                motion=None if flows is None else flows[lo:hi - 1]))
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_chunk_context_default_kernel_needs_two_frames_of_overlap():
    assert chunk_context(10, 20, 100) == (8, 22)
    assert chunk_context(0, 20, 100) == (0, 22)
    assert chunk_context(90, 100, 100) == (88, 100)
    with pytest.raises(ValueError, match="frames"):
        temporal_filter_chunk(_random_clip(t=5), np.zeros((20, 24)), 10, 15, 30)


def test_mean_noise_pattern_is_mask_weighted():
    pattern = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32)
    mask = np.array([[1.0, 0.0], [0.5, 0.0]], np.float32)
    assert mean_noise_pattern(pattern, mask) == pytest.approx((1.0 + 2.5) / 1.5)
    assert mean_noise_pattern(pattern) == pytest.approx(4.0)
    seq = np.stack([pattern, 2 * pattern])
    assert mean_noise_pattern(seq, mask) == pytest.approx(1.5 * (1.0 + 2.5) / 1.5)
    assert mean_noise_pattern(pattern, np.zeros_like(mask)) == 0.0


def test_heatmap_is_rgb_uint8_and_ordered():
    pattern = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    img = noise_pattern_heatmap(pattern)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    brightness = img.astype(int).sum(axis=-1).ravel()
    assert brightness[-1] > brightness[0]
    flat = noise_pattern_heatmap(np.zeros((4, 4)))
    assert (flat == flat[0, 0]).all()  # all-zero pattern: one colour, no division by zero


def test_module_constants():
    assert noise_sensor.DEFAULT_KERNEL_SIZE == 5


def test_cpbd_sharp_edges_score_higher_than_blurred(samples_dir):
    import cv2

    from freetalk_core.cpbd import cpbd

    av = pytest.importorskip("av")
    with av.open(str(samples_dir / "MimicTalk__May_5s.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    sharp = cpbd(frame)
    soft = cpbd(cv2.GaussianBlur(frame, (0, 0), 0.7))
    blurred = cpbd(cv2.GaussianBlur(frame, (0, 0), 2.0))
    assert 0.05 < sharp <= 1.0
    assert sharp > soft > blurred >= 0.0


def _step_image(position, width=192, height=128, low=0.0, high=200.0):
    """`(height, width)` float64: a vertical step from `low` to `high` at x = `position` (px,
    pixel x covering [x - 0.5, x + 0.5]), anti-aliased by area coverage."""
    coverage = np.clip(np.arange(width) + 0.5 - position, 0.0, 1.0)
    return np.repeat((low + (high - low) * coverage)[None], height, axis=0)


def test_cpbd_integer_step_tie_pins_edge_column():
    """An integer step has two equal Sobel maxima (columns 63 and 64): the thinning keeps
    exactly the left one, its Marziliano width is 2 and the step scores 1.0."""
    from freetalk_core.cpbd import cpbd, edge_widths, sobel_vertical_edges

    image = _step_image(63.5, width=128)
    assert (image[:, :64] == 0).all() and (image[:, 64:] == 200).all()
    edges = sobel_vertical_edges(image)
    assert edges[:, 63].all() and edges.sum() == image.shape[0]
    widths = edge_widths(image, edges)
    np.testing.assert_array_equal(widths[1:-1, 63], 2.0)
    assert (widths[:, :63] == 0).all() and (widths[:, 64:] == 0).all()
    assert cpbd(image.astype(np.uint8)) == 1.0


def test_cpbd_falling_step_width_stops_at_the_flat():
    """A falling integer step followed by flat grey has the rising step's width, 2 (the walk
    to the right stops at the first flat step)."""
    from freetalk_core.cpbd import cpbd, edge_widths, sobel_vertical_edges

    image = _step_image(63.5, width=128, low=200.0, high=0.0)
    widths = edge_widths(image, sobel_vertical_edges(image))
    np.testing.assert_array_equal(widths[1:-1, 63], 2.0)
    assert cpbd(image.astype(np.uint8)) == 1.0


def test_cpbd_edge_as_wide_as_jnb_counts_as_sharp():
    """A high-contrast edge 3 pixels wide (w_JNB for contrast > 50) has P = 1 - 1/e = 63.2%:
    the release counts it in its first 64 histogram bins, as not blurred."""
    from freetalk_core.cpbd import cpbd, edge_widths, sobel_vertical_edges

    image = np.zeros((128, 192))
    image[:, 91], image[:, 92], image[:, 93:] = 67.0, 133.0, 200.0
    widths = edge_widths(image, sobel_vertical_edges(image))
    assert set(np.unique(widths[1:-1])) == {0.0, 3.0}
    assert cpbd(image) == 1.0


@pytest.mark.parametrize("sobel_column", [63, 64])
@pytest.mark.parametrize("canny_columns", [(63,), (64,), (63, 64)])
def test_cpbd_counts_a_sharp_edge_wherever_the_detectors_put_it(sobel_column, canny_columns):
    """A sharp step on the border of two blocks plus a blurred ramp in a third block: each
    edge counts once, whichever block each detector puts the step in (0.5 = 1 sharp : 1
    blurred edge per row)."""
    from freetalk_core.cpbd import cpbd_from_edges

    image = _step_image(63.5)
    image[:, 140:160] = np.linspace(200.0, 0.0, 20)  # a 20-pixel ramp down: blurred
    image[:, 160:] = 0.0
    sobel = np.zeros(image.shape, bool)
    canny = np.zeros(image.shape, bool)
    sobel[:, sobel_column] = canny[:, 150] = sobel[:, 150] = True
    for column in canny_columns:
        canny[:, column] = True
    assert cpbd_from_edges(image, sobel, canny) == 0.5


@pytest.mark.parametrize("offset", [(k + 0.5) / 8 for k in range(8)])
def test_cpbd_subpixel_step_sharper_than_blurred(offset):
    """A rising or falling step anywhere between columns 63 and 64 (across a block border,
    never an exact tie) is sharp; its Gaussian-blurred copy scores lower."""
    from scipy import ndimage

    from freetalk_core.cpbd import cpbd

    for image in (_step_image(63.0 + offset), _step_image(63.0 + offset, low=200.0, high=0.0)):
        sharp = cpbd(image)
        blurred = cpbd(ndimage.gaussian_filter1d(image, 2.0, axis=1))
        assert sharp >= 0.9
        assert blurred < sharp


def test_cpbd_same_with_one_thread_and_default(samples_dir, tmp_path):
    """Sample face crops score the same in-process and in fresh processes with
    OMP_NUM_THREADS=1 and with it unset."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import freetalk_core
    from freetalk_core.cpbd import cpbd

    av = pytest.importorskip("av")
    with av.open(str(samples_dir / "MimicTalk__May_5s.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    h, w = frame.shape[:2]
    crops = np.stack([frame[:200, :200], frame[h // 2 - 63:h // 2 + 137, w // 2 - 95:w // 2 + 105]])
    np.save(tmp_path / "crops.npy", crops)
    expected = [cpbd(c) for c in crops]
    assert all(0.0 < v < 1.0 for v in expected)
    script = ("import json, sys, numpy as np; from freetalk_core.cpbd import cpbd; "
              "print(json.dumps([cpbd(c) for c in np.load(sys.argv[1])]))")
    root = str(Path(freetalk_core.__file__).resolve().parents[1])
    for threads in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        if threads is not None:
            env["OMP_NUM_THREADS"] = threads
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "crops.npy")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected, f"OMP_NUM_THREADS={threads}"


def _textured_clip(shifts, blur=0.0, gamma=1.0, size=96, seed=11):
    """`(T, size, size, 3) uint8`: one smooth random texture translated by `shifts` (px)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(size // 4, size // 4, 3)).astype(np.float32)
    base = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    frames = []
    for dx, dy in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        f = cv2.warpAffine(base, m, (size, size), flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
        if blur:
            f = cv2.GaussianBlur(f, (0, 0), blur)
        f = 255.0 * (np.clip(f, 0, 255) / 255.0) ** gamma
        frames.append(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    return np.stack(frames)


def test_noise_pattern_of_real_flow_reads_known_jitter_and_ignores_appearance():
    from freetalk_core.flow import optical_flow

    rng = np.random.default_rng(2)
    t = np.arange(40)
    motion = np.stack([2.0 * np.sin(t / 4.0), 1.5 * np.cos(t / 6.0)], axis=1)  # genuine motion
    jitter = rng.normal(0.0, 0.5, size=motion.shape)
    reference = optical_flow(_textured_clip(motion, blur=1.2, gamma=0.8))  # structure-like
    clean = optical_flow(_textured_clip(motion))
    noisy = optical_flow(_textured_clip(motion + jitter))
    centre = (slice(24, -24), slice(24, -24))
    # the jitter's own flow is the difference of consecutive shifts; N is the norm of its
    # per-component variances (2 sqrt(2) j^2 = 0.71 in expectation, this draw's value here)
    truth = np.linalg.norm(np.diff(jitter, axis=0).var(axis=0))
    assert 0.5 < truth < 1.0
    sensed = np.median(noise_pattern(noisy, reference)[centre])
    assert sensed == pytest.approx(truth, rel=0.4)
    # the same motion seen through another appearance is (almost) no noise
    assert np.median(noise_pattern(clean, reference)[centre]) < 0.1 * truth


def test_ideal_flow_is_the_linear_estimate_from_the_reference():
    g, r, noise = _synthetic_flows(n=5000)
    ideal = ideal_flow(g, r)
    np.testing.assert_allclose(ideal, g - noise, atol=0.1)  # a*r + b with a, b estimated
    assert ideal.shape == g.shape and ideal.dtype == np.float32
    # where the reference does not move, the generated flow's mean
    still = ideal_flow(g, np.zeros_like(r))
    np.testing.assert_allclose(still, np.broadcast_to(g.mean(axis=0), g.shape), atol=1e-5)


def test_windowed_ideal_flow_uses_each_flow_fields_own_window():
    rng = np.random.default_rng(12)
    n, w = 30, 8
    r = rng.normal(size=(n, 3, 4, 2)).astype(np.float32)
    slope = np.linspace(0.5, 2.0, n)[:, None, None, None]  # the relation drifts over the clip
    g = (slope * r + rng.normal(0.0, 0.3, size=r.shape)).astype(np.float32)
    np.testing.assert_array_equal(ideal_flow(g, r, window=n), ideal_flow(g, r))
    local = ideal_flow(g, r, window=w)
    for i in (0, 3, 14, 29):
        lo = int(np.clip(i + 1 - w // 2, 0, n - w))  # the window centred on flow field i
        np.testing.assert_allclose(local[i], ideal_flow(g[lo:lo + w], r[lo:lo + w])[i - lo], atol=1e-4)
    truth = slope * r
    assert np.abs(local - truth).mean() < np.abs(ideal_flow(g, r) - truth).mean()
    with pytest.raises(ValueError, match="window"):
        ideal_flow(g, r, window=1)


def test_filter_along_zero_motion_equals_filter_in_place():
    frames = _random_clip(t=9)
    sigma = np.random.default_rng(3).uniform(0.0, 2.0, size=frames.shape[1:3]).astype(np.float32)
    zero = np.zeros(frames.shape[:3] + (2,), np.float32)[1:]
    np.testing.assert_array_equal(temporal_filter(frames, sigma, motion=zero), temporal_filter(frames, sigma))
    with pytest.raises(ValueError, match="motion"):
        temporal_filter(frames, sigma, motion=zero[1:])


def test_filtering_along_the_motion_removes_jitter_without_blurring_the_motion():
    from freetalk_core.flow import optical_flow

    rng = np.random.default_rng(5)
    t = np.arange(30)
    motion = np.stack([4.0 * np.sin(t / 3.0), 2.7 * np.cos(t / 4.0)], axis=1)  # fast genuine motion
    clean = _textured_clip(motion)
    noisy = _textured_clip(motion + rng.normal(0.0, 0.6, size=motion.shape))
    g, r = optical_flow(noisy), optical_flow(_textured_clip(motion, blur=1.2, gamma=0.8))
    pattern = noise_pattern(g, r)
    centre = (slice(None), slice(20, -20), slice(20, -20))

    def psnr(a):
        diff = a[centre].astype(np.float64) - clean[centre].astype(np.float64)
        return 10 * np.log10(255.0 ** 2 / (diff * diff).mean())

    in_place = psnr(temporal_filter(noisy, pattern))
    along = psnr(temporal_filter(noisy, pattern, motion=ideal_flow(g, r)))
    # In place, the filter averages pixels the motion has carried away; along the motion it
    # averages the same surface point and only the jitter goes.
    # Measured: noisy 21.6 dB, in place 23.5 dB, along the motion 25.1 dB.
    assert along > psnr(noisy) + 2.0
    assert along > in_place + 1.0


@pytest.mark.parametrize("window", [6, 1000])
def test_streamed_statistics_of_any_chunk_equal_the_whole_clip(window):
    """The pipeline reads flows a block at a time and computes each chunk's statistics alone:
    the same patterns and ideal flow as the in-memory whole-clip functions, to float rounding."""
    rng = np.random.default_rng(11)
    n_flows = 31
    r = rng.normal(size=(n_flows, 4, 5, 2)).astype(np.float32)
    noise_std = np.where(np.arange(n_flows) < 15, 0.2, 1.5)[:, None, None, None]
    g = (1.3 * r + 4.0 + rng.normal(size=r.shape) * noise_std).astype(np.float32)
    reads = []

    def read(a, b):
        reads.append(b - a)
        return g[a:b], r[a:b]

    whole_patterns = noise_pattern_sequence(g, r, window)
    whole_ideal = ideal_flow(g, r, None if window >= n_flows else window)
    shift = noise_sensor.flow_means(read, n_flows, block=4)
    for first, stop in [(0, n_flows + 1), (0, 7), (7, 14), (20, n_flows + 1), (13, 14)]:
        streamed = np.stack([p for _, p in noise_sensor.window_noise_patterns(
            read, n_flows, window, first, stop, shift, block=4)])
        np.testing.assert_allclose(streamed, whole_patterns[first:stop], rtol=1e-5, atol=1e-6)
        flows = noise_sensor.ideal_flow_range(read, n_flows, window, first, min(stop, n_flows), shift, block=4)
        np.testing.assert_allclose(flows, whole_ideal[first:min(stop, n_flows)], rtol=1e-5, atol=1e-5)
    assert max(reads) <= 4  # never more than a block of flow fields at once
