"""Noise Sensor (METHOD.md step 8): find flicker and jitter per pixel, smooth only there.

Per pixel and per flow component, the part of the generated flow's variance over time that
the reference flow does not explain linearly is noise (Theorem 1):

    var_noise = var(g) - cov(g, r)^2 / var(r)        (= var(g) * (1 - rho^2))

The noise pattern N(p) is the norm of the (x, y) pair of noise variances. Each pixel is then
smoothed over time with a Gaussian whose standard deviation (in frames) is N(p), kernel size 5
by default (offsets -2..2, weights summing to 1, the time axis padded by repeating the end
frames, never wrapped), inside the mouth mask only; where N(p) is ~0 the pixel is left exactly
as it was. MNP, the mean noise pattern over the mouth region, measures what is left.

The statistics are local in time: frame t uses a sliding window of flow fields around it
(`noise_pattern_sequence`, `window_noise_patterns`; the pipeline's window is 100 flow fields,
the whole clip when it is shorter), so motion that changes along a long clip gets its own
estimate. The streaming functions (`window_moments`, `ideal_flow_range`,
`temporal_filter_chunk`) read the flows a block at a time, so a chunk of frames is filtered
with its own frames' statistics without the whole clip in memory.

Where the pixel is, in the neighbouring frames, is a choice: along its genuine motion (the
pipeline's default: `motion=ideal_flow(g, r)`, the part of the generated flow the reference
explains, Theorem 1's linear estimate `a * r + b`), or in place (`motion=None`, the plain
filter, kept as an option). Along the motion, the Gaussian averages the same point of the lips in each
frame, so a moving mouth is not blurred and what is averaged away is the jitter and flicker
only.
"""

from __future__ import annotations

from typing import Callable, Tuple

import cv2
import numpy as np

DEFAULT_KERNEL_SIZE = 5
VAR_EPS = 1e-6
"""var(r) below this (px^2) means the reference does not move there: the guard treats all of
var(g) as noise instead of dividing by ~0."""
SIGMA_EPS = 1e-3
"""A noise pattern below this (frames) gives the identity filter: exp(-1 / (2 * 1e-6)) is 0."""
FILTER_BLOCK_FRAMES = 16
"""Frames filtered at once; bounds the float32 working memory to a few blocks of frames."""


def _check_flows(generated_flow: np.ndarray, reference_flow: np.ndarray):
    g = np.asarray(generated_flow)
    r = np.asarray(reference_flow)
    if g.ndim != 4 or g.shape[-1] != 2:
        raise ValueError(f"generated_flow must be (T-1, H, W, 2), got {g.shape}")
    if r.shape != g.shape:
        raise ValueError(f"reference_flow must have the generated flow's shape {g.shape}, got {r.shape}")
    if g.shape[0] < 2:
        raise ValueError(f"the noise pattern needs at least 2 flow fields (3 frames), got {g.shape[0]}")
    return g, r


def _noise_variance_from_moments(var_g: np.ndarray, var_r: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Theorem 1 per component, with the guard where the reference does not move (var(r) ~0:
    all of var(g) is noise), clipped at 0 against rounding."""
    moving = var_r > VAR_EPS
    explained = np.where(moving, cov * cov / np.where(moving, var_r, 1.0), 0.0)
    return np.clip(var_g - explained, 0.0, None)


def _norm_xy(noise_var: np.ndarray) -> np.ndarray:
    """`(..., 2)` noise variances -> `(...)` float32 noise pattern."""
    return np.sqrt((noise_var * noise_var).sum(axis=-1)).astype(np.float32)


def _moving_box(g: np.ndarray, r: np.ndarray) -> tuple[int, int, int, int] | None:
    """`(y0, y1, x0, x1)` bounding the pixels where either flow is ever non-zero (flow is
    computed in the mouth box only; outside it both variances are 0, and so is the noise)."""
    moving = (g != 0).any(axis=(0, 3)) | (r != 0).any(axis=(0, 3))
    rows = np.flatnonzero(moving.any(axis=1))
    cols = np.flatnonzero(moving.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _moments(g: np.ndarray, r: np.ndarray):
    """Per pixel and component over time: `(mean g, mean r, var g, var r, cov(g, r))` float64,
    population (1/n) moments. Two passes, one flow field at a time: exact centred moments
    without a float64 copy of the whole clip's flow."""
    n = g.shape[0]
    mean_g = g.mean(axis=0, dtype=np.float64)
    mean_r = r.mean(axis=0, dtype=np.float64)
    var_g = np.zeros_like(mean_g)
    var_r = np.zeros_like(mean_r)
    cov = np.zeros_like(mean_g)
    for t in range(n):
        dg = g[t] - mean_g
        dr = r[t] - mean_r
        var_g += dg * dg
        var_r += dr * dr
        cov += dg * dr
    return mean_g, mean_r, var_g / n, var_r / n, cov / n


def noise_variance(generated_flow: np.ndarray, reference_flow: np.ndarray) -> np.ndarray:
    """Theorem 1 noise variance per pixel and flow component, over all the flow fields given.

    Args:
        generated_flow: `(T-1, H, W, 2)` float32, flow of the generated frames.
        reference_flow: `(T-1, H, W, 2)` float32, flow of the reference motion.

    Returns:
        `(H, W, 2)` float32 in px^2, >= 0. Population (1/n) moments.
    """
    g, r = _check_flows(generated_flow, reference_flow)
    out = np.zeros(g.shape[1:], dtype=np.float32)
    box = _moving_box(g, r)
    if box is None:
        return out
    _, _, var_g, var_r, cov = _moments(g[:, box[0]:box[1], box[2]:box[3]], r[:, box[0]:box[1], box[2]:box[3]])
    out[box[0]:box[1], box[2]:box[3]] = _noise_variance_from_moments(var_g, var_r, cov)
    return out


def ideal_flow(generated_flow: np.ndarray, reference_flow: np.ndarray,
               window: int | None = None) -> np.ndarray:
    """Theorem 1's optimal linear estimate of the noise-free generated flow from the reference.

    Per pixel and component, `a * r + b` with `a = cov(g, r) / var(r)` and
    `b = mean(g) - a * mean(r)`: the genuine motion of the generated frames, as far as the
    reference explains it (its residual is the noise `noise_variance` measures). Where the
    reference does not move (var(r) ~0) it is the generated flow's mean.

    Args:
        generated_flow: `(T-1, H, W, 2)` float32, flow of the generated frames.
        reference_flow: `(T-1, H, W, 2)` float32, flow of the reference motion.
        window: None (or >= T-1): `a` and `b` from the whole clip. Otherwise a number of flow
            fields: flow field i (frames i -> i+1) uses the statistics of frame i+1's sliding
            window (see `noise_pattern_sequence`), the window centred on it.

    Returns:
        `(T-1, H, W, 2)` float32 flow, zero wherever both flows are zero throughout.
    """
    g, r = _check_flows(generated_flow, reference_flow)
    out = np.zeros(g.shape, dtype=np.float32)
    box = _moving_box(g, r)
    if box is None:
        return out
    g, r = g[:, box[0]:box[1], box[2]:box[3]], r[:, box[0]:box[1], box[2]:box[3]]
    inner = out[:, box[0]:box[1], box[2]:box[3]]

    def line(moments):
        mean_g, mean_r, _, var_r, cov = moments
        moving = var_r > VAR_EPS
        return np.where(moving, cov / np.where(moving, var_r, 1.0), 0.0), mean_g, mean_r

    if window is None or window >= g.shape[0]:
        slope, mean_g, mean_r = line(_moments(g, r))
        inner[:] = slope * (r - mean_r) + mean_g
        return out
    if window < 2:
        raise ValueError(f"window must be >= 2 flow fields, got {window}")
    # Flow field i lies between frames i and i+1: it takes frame i+1's window, the one
    # centred on it.
    for t, moments in enumerate(_window_moments(g, r, window)):
        if moments is not None:
            slope, mean_g, mean_r = line(moments)
        if t > 0:
            inner[t - 1] = slope * (r[t - 1] - mean_r) + mean_g
    return out


def noise_pattern(generated_flow: np.ndarray, reference_flow: np.ndarray,
                  window: int | None = None) -> np.ndarray:
    """Noise pattern N(p) of a clip.

    Args:
        generated_flow: `(T-1, H, W, 2)` float32, flow of the generated frames.
        reference_flow: `(T-1, H, W, 2)` float32, flow of the reference motion.
        window: None (or >= T-1): statistics over the whole clip. Otherwise a number of flow
            fields: the per-frame sliding-window patterns of `noise_pattern_sequence`,
            averaged over the clip.

    Returns:
        `(H, W)` float32 noise pattern, >= 0 (norm of the x and y noise variances, px^2; the
        filter uses it as a standard deviation in frames).
    """
    g, r = _check_flows(generated_flow, reference_flow)
    if window is None or window >= g.shape[0]:
        return _norm_xy(noise_variance(g, r).astype(np.float64))
    return noise_pattern_sequence(g, r, window).mean(axis=0)


def _window_bounds(n_flows: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """For each frame t of a clip with `n_flows + 1` frames, the flow fields [lo, hi) of its
    window: `window` fields centred between frames t-1 and t, shifted to stay inside the clip."""
    t = np.arange(n_flows + 1)
    lo = np.clip(t - window // 2, 0, n_flows - window)
    return lo, lo + window


def noise_pattern_sequence(generated_flow: np.ndarray, reference_flow: np.ndarray,
                           window: int) -> np.ndarray:
    """Local noise pattern per frame, from a sliding temporal window of flow fields.

    A long clip whose motion changes gets a local estimate: frame t uses the `window` flow
    fields around it; near the clip's ends the window slides to stay inside the clip.

    Args:
        generated_flow: `(T-1, H, W, 2)` float32.
        reference_flow: `(T-1, H, W, 2)` float32.
        window: flow fields per window, >= 2. A window covering the clip gives the whole-clip
            pattern for every frame.

    Returns:
        `(T, H, W)` float32 noise pattern per frame.
    """
    g, r = _check_flows(generated_flow, reference_flow)
    n = g.shape[0]
    if window < 2:
        raise ValueError(f"window must be >= 2 flow fields, got {window}")
    window = min(window, n)
    out = np.zeros((n + 1,) + g.shape[1:3], dtype=np.float32)
    box = _moving_box(g, r)
    if box is None:
        return out
    inner = out[:, box[0]:box[1], box[2]:box[3]]
    moments = _window_moments(g[:, box[0]:box[1], box[2]:box[3]], r[:, box[0]:box[1], box[2]:box[3]], window)
    for t, m in enumerate(moments):
        inner[t] = inner[t - 1] if m is None else _norm_xy(_noise_variance_from_moments(*m[2:]))
    return out


def _window_moments(g: np.ndarray, r: np.ndarray, window: int):
    """`window_moments` of in-memory flows, every frame of the clip."""
    return (m for _, m in window_moments(lambda a, b: (g[a:b], r[a:b]), g.shape[0], window,
                                         shift=(g.mean(axis=0, dtype=np.float64),
                                                r.mean(axis=0, dtype=np.float64))))


FlowReader = Callable[[int, int], Tuple[np.ndarray, np.ndarray]]
"""`read(start, stop) -> (generated, reference)`: flow fields `[start, stop)` of a clip, each
`(stop - start, H, W, 2)` float (e.g. read from a chunked array on disk)."""
FLOW_BLOCK = 25
"""Flow fields read at once by the streaming statistics."""


class _FlowCursor:
    """Flow field i of a `FlowReader`, for i increasing: one block of fields in memory."""

    def __init__(self, read: FlowReader, n_flows: int, block: int):
        self.read, self.n, self.block = read, n_flows, max(1, block)
        self.start, self.g, self.r = -1, None, None

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.g is None or not self.start <= i < self.start + len(self.g):
            self.start = i
            self.g, self.r = (np.asarray(a, dtype=np.float32)
                              for a in self.read(i, min(self.n, i + self.block)))
        return self.g[i - self.start], self.r[i - self.start]


def flow_means(read: FlowReader, n_flows: int, block: int = FLOW_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """`(mean g, mean r)` `(H, W, 2)` float64 over all `n_flows` flow fields, read a block at a time."""
    sum_g = sum_r = None
    for start in range(0, n_flows, block):
        g, r = read(start, min(n_flows, start + block))
        bg, br = np.sum(g, axis=0, dtype=np.float64), np.sum(r, axis=0, dtype=np.float64)
        sum_g = bg if sum_g is None else sum_g + bg
        sum_r = br if sum_r is None else sum_r + br
    return sum_g / n_flows, sum_r / n_flows


def window_moments(read: FlowReader, n_flows: int, window: int, first: int = 0,
                   stop: int | None = None, shift: tuple[np.ndarray, np.ndarray] | None = None,
                   block: int = FLOW_BLOCK):
    """Sliding-window statistics streamed from a `FlowReader`; memory of a few blocks of flow
    fields, whatever the clip's length.

    For each frame t in `[first, stop)` (default: all `n_flows + 1` frames) yields
    `(t, moments)`: the `_moments` `(mean g, mean r, var g, var r, cov(g, r))`, each
    `(H, W, 2)` float64, of the `min(window, n_flows)` flow fields of t's window (see
    `_window_bounds`), or None when they are frame t-1's. The running sums start at frame
    `first`'s window, so any range of frames can be computed alone (a chunk of a long clip),
    equal to the whole-clip pass up to float rounding. They are shifted by the clip's mean
    flow (`shift`, default `flow_means`) so the subtraction stays accurate.
    """
    window = min(window, n_flows)
    if window < 2:
        raise ValueError(f"window must be >= 2 flow fields, got {window}")
    stop = n_flows + 1 if stop is None else stop
    lo, hi = _window_bounds(n_flows, window)
    shift_g, shift_r = flow_means(read, n_flows, block) if shift is None else shift
    sums = np.zeros((5,) + shift_g.shape, dtype=np.float64)
    ahead, behind = _FlowCursor(read, n_flows, block), _FlowCursor(read, n_flows, block)

    def update(flow: tuple[np.ndarray, np.ndarray], sign: float) -> None:
        dg = flow[0] - shift_g
        dr = flow[1] - shift_r
        sums[0] += sign * dg
        sums[1] += sign * dr
        sums[2] += sign * dg * dg
        sums[3] += sign * dr * dr
        sums[4] += sign * dg * dr

    cur_lo = cur_hi = int(lo[first]) if first < len(lo) else 0
    for t in range(first, stop):
        if t > first and lo[t] == lo[t - 1]:
            yield t, None
            continue
        while cur_hi < hi[t]:
            update(ahead(cur_hi), 1.0)
            cur_hi += 1
        while cur_lo < lo[t]:
            update(behind(cur_lo), -1.0)
            cur_lo += 1
        mg, mr = sums[0] / window, sums[1] / window
        yield t, (mg + shift_g, mr + shift_r, sums[2] / window - mg * mg,
                  sums[3] / window - mr * mr, sums[4] / window - mg * mr)


def window_noise_patterns(read: FlowReader, n_flows: int, window: int, first: int = 0,
                          stop: int | None = None, shift=None, block: int = FLOW_BLOCK):
    """Yields `(t, pattern)`: frame t's local noise pattern `(H, W)` float32 (as
    `noise_pattern_sequence` gives it), for t in `[first, stop)`, streamed (`window_moments`)."""
    pattern = None
    for t, m in window_moments(read, n_flows, window, first, stop, shift, block):
        if m is not None:
            pattern = _norm_xy(_noise_variance_from_moments(*m[2:]))
        yield t, pattern


def clip_noise_pattern(read: FlowReader, n_flows: int, window: int, shift=None,
                       block: int = FLOW_BLOCK) -> np.ndarray:
    """The clip's noise pattern `(H, W)` float64: the mean over its frames of their local
    (sliding-window) patterns, streamed. `shift`: the clip's mean flows (`flow_means`, computed
    here when not given)."""
    if shift is None:
        shift = flow_means(read, n_flows, block)
    total = None
    for _, pattern in window_noise_patterns(read, n_flows, window, shift=shift, block=block):
        total = pattern.astype(np.float64) if total is None else total + pattern
    return total / (n_flows + 1)


def ideal_flow_range(read: FlowReader, n_flows: int, window: int, start: int, stop: int,
                     shift=None, block: int = FLOW_BLOCK) -> np.ndarray:
    """`ideal_flow(g, r, window)[start:stop]` `(stop - start, H, W, 2)` float32, streamed:
    flow field i uses frame i+1's window (`window >= n_flows`: the whole clip's line)."""
    out = None
    slope = mean_g = mean_r = None
    reader = _FlowCursor(read, n_flows, block)
    for t, m in window_moments(read, n_flows, window, start + 1, stop + 1, shift, block):
        if m is not None:
            mean_g, mean_r, _, var_r, cov = m
            moving = var_r > VAR_EPS
            slope = np.where(moving, cov / np.where(moving, var_r, 1.0), 0.0)
        _, r = reader(t - 1)
        value = slope * (r - mean_r) + mean_g
        if out is None:
            out = np.zeros((stop - start,) + value.shape, dtype=np.float32)
        out[t - 1 - start] = value
    if out is None:
        g, _ = read(0, 1)
        out = np.zeros((0,) + np.shape(g)[1:], dtype=np.float32)
    return out


def gaussian_weights(sigma: np.ndarray, kernel_size: int = DEFAULT_KERNEL_SIZE) -> np.ndarray:
    """Normalised temporal Gaussian weights per pixel.

    Args:
        sigma: `(...)` float, standard deviation in frames (the noise pattern).
        kernel_size: odd number of taps; offsets -(k // 2) .. k // 2.

    Returns:
        `(kernel_size, ...)` float32, summing to 1 over the first axis; `sigma` ~0 gives weight
        exactly 1 at offset 0 and exactly 0 elsewhere.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    sigma = np.asarray(sigma, dtype=np.float32)
    half = kernel_size // 2
    offsets = np.arange(-half, half + 1, dtype=np.float32).reshape((-1,) + (1,) * sigma.ndim)
    s = np.maximum(sigma, SIGMA_EPS)
    logits = -(offsets * offsets) / (2.0 * s * s)
    weights = np.exp(logits)  # offset 0 has weight exactly 1, so the sum is never 0
    return (weights / weights.sum(axis=0)).astype(np.float32)


def chunk_context(start: int, stop: int, n_frames: int,
                  kernel_size: int = DEFAULT_KERNEL_SIZE) -> tuple[int, int]:
    """Frames `[lo, hi)` of the clip that filtering output frames `[start, stop)` needs: the
    chunk plus `kernel_size // 2` neighbours on each side (2 for the default kernel), fewer at
    the clip ends."""
    if not 0 <= start < stop <= n_frames:
        raise ValueError(f"need 0 <= start < stop <= n_frames, got {start}, {stop}, {n_frames}")
    half = kernel_size // 2
    return max(0, start - half), min(n_frames, stop + half)


def _per_frame(name: str, values, n: int, hw: tuple[int, int]) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float32)
    if values.shape == hw:
        return values[None]
    if values.shape == (n,) + hw:
        return values
    raise ValueError(f"{name} must be {hw} or {(n,) + hw}, got {values.shape}")


def _trajectory_frames(context: np.ndarray, motion: np.ndarray, t: int, offsets, lo: int,
                       n_frames: int) -> list[np.ndarray]:
    """For each offset k, frame `t + k` (clip index, clamped to the clip) resampled where frame
    t's pixels have moved to: positions chained along `motion` (flow from each frame to the
    next; backwards by its negation). `(h, w, 3)` float32 each; context and motion are the
    box's frames and flows starting at clip frame `lo`."""
    h, w = context.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = {}
    for direction in (1, -1):
        px, py = xs.copy(), ys.copy()
        frame = t
        steps = sorted((k for k in offsets if k * direction > 0), key=abs)
        for k in steps:
            while frame != min(max(t + k, 0), n_frames - 1):
                # the flow between `frame` and its neighbour in this direction
                index = (frame if direction > 0 else frame - 1) - lo
                flow = motion[index]
                dx = cv2.remap(flow[..., 0], px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                dy = cv2.remap(flow[..., 1], px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                px, py = px + direction * dx, py + direction * dy
                frame += direction
            out[k] = cv2.remap(context[frame - lo], px, py, cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    out[0] = context[t - lo].astype(np.float32)
    return [out[k] for k in offsets]


def temporal_filter_chunk(context_frames: np.ndarray, noise_pattern: np.ndarray,
                          start: int, stop: int, n_frames: int,
                          kernel_size: int = DEFAULT_KERNEL_SIZE,
                          mask: np.ndarray | None = None,
                          motion: np.ndarray | None = None) -> np.ndarray:
    """Adaptive temporal Gaussian filter for output frames `[start, stop)` of a longer clip.

    Filtering a clip chunk by chunk with this function gives exactly the frames
    `temporal_filter` gives for the whole clip.

    Args:
        context_frames: `(hi - lo, H, W, 3)` uint8, frames `[lo, hi)` of the clip, with
            `(lo, hi) = chunk_context(start, stop, n_frames, kernel_size)`.
        noise_pattern: `(H, W)` float, or `(stop - start, H, W)` per output frame: the
            Gaussian's standard deviation in frames.
        start, stop: the output frames, as indices into the whole clip.
        n_frames: length of the whole clip (its ends are padded by edge replication).
        kernel_size: odd number of taps (5 by default).
        mask: None (filter everywhere), `(H, W)` or `(stop - start, H, W)` float in [0, 1]:
            the filtered frame is blended in by this weight; where it is 0 the output is
            exactly the input.
        motion: None, or `(hi - lo - 1, H, W, 2)` float32 flow between consecutive context
            frames (e.g. `ideal_flow`): each pixel is then smoothed along its motion
            trajectory instead of at a fixed position.

    Returns:
        `(stop - start, H, W, 3)` uint8 filtered frames.
    """
    context_frames = np.asarray(context_frames)
    lo, hi = chunk_context(start, stop, n_frames, kernel_size)
    if context_frames.ndim != 4 or context_frames.shape[-1] != 3 or context_frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {context_frames.shape} "
                         f"{context_frames.dtype}")
    if context_frames.shape[0] != hi - lo:
        raise ValueError(f"frames for output [{start}, {stop}) must be the clip's frames "
                         f"[{lo}, {hi}) ({hi - lo} frames), got {context_frames.shape[0]}")
    hw = context_frames.shape[1:3]
    if motion is not None:
        motion = np.asarray(motion, dtype=np.float32)
        if motion.shape != (hi - lo - 1,) + hw + (2,):
            raise ValueError(f"motion for context frames [{lo}, {hi}) must be "
                             f"{(hi - lo - 1,) + hw + (2,)}, got {motion.shape}")
    n_out = stop - start
    sigma = _per_frame("noise_pattern", noise_pattern, n_out, hw)
    blend = _per_frame("mask", mask, n_out, hw)
    if blend is not None and (blend.min() < 0 or blend.max() > 1):
        raise ValueError("mask must be in [0, 1]")

    out = context_frames[start - lo:stop - lo].copy()
    # Only pixels that some frame both smooths (sigma > eps) and keeps (mask > 0) can change.
    active = (sigma > SIGMA_EPS).any(axis=0)
    if blend is not None:
        active &= (blend > 0).any(axis=0)
    rows = np.flatnonzero(active.any(axis=1))
    cols = np.flatnonzero(active.any(axis=0))
    if rows.size == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1

    half = kernel_size // 2
    offsets = range(-half, half + 1)
    for b0 in range(start, stop, FILTER_BLOCK_FRAMES):
        b1 = min(stop, b0 + FILTER_BLOCK_FRAMES)
        t = np.arange(b0, b1)
        s = sigma[0 if sigma.shape[0] == 1 else slice(b0 - start, b1 - start), y0:y1, x0:x1]
        weights = gaussian_weights(s, kernel_size)  # (k, [b], h, w)
        acc = np.zeros((b1 - b0, y1 - y0, x1 - x0, 3), dtype=np.float32)
        if motion is None:
            for k, offset in enumerate(offsets):
                source = np.clip(t + offset, 0, n_frames - 1) - lo
                acc += weights[k][..., None] * context_frames[source, y0:y1, x0:x1]
        else:
            box_frames, box_motion = context_frames[:, y0:y1, x0:x1], motion[:, y0:y1, x0:x1]
            for i, frame in enumerate(t):
                moved = _trajectory_frames(box_frames, box_motion, int(frame), list(offsets), lo, n_frames)
                w = weights[:, i] if weights.ndim == 4 else weights
                for k in range(len(moved)):
                    acc[i] += w[k][..., None] * moved[k]
        original = context_frames[b0 - lo:b1 - lo, y0:y1, x0:x1]
        if blend is not None:
            m = blend[0 if blend.shape[0] == 1 else slice(b0 - start, b1 - start), y0:y1, x0:x1]
            m = np.broadcast_to(m[..., None], acc.shape)
            acc = np.where(m >= 1, acc, original + m * (acc - original))
            keep = m == 0
        else:
            keep = np.zeros(acc.shape, dtype=bool)
        filtered = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
        out[b0 - start:b1 - start, y0:y1, x0:x1] = np.where(keep, original, filtered)
    return out


def temporal_filter(frames: np.ndarray, noise_pattern: np.ndarray,
                    kernel_size: int = DEFAULT_KERNEL_SIZE,
                    mask: np.ndarray | None = None,
                    motion: np.ndarray | None = None) -> np.ndarray:
    """Adaptive temporal Gaussian filter: each pixel smoothed over time with sigma = N(p).

    Args:
        frames: `(T, H, W, 3)` uint8 RGB.
        noise_pattern: `(H, W)` or `(T, H, W)` float, standard deviation in frames; ~0 leaves
            the pixel unchanged.
        kernel_size: odd number of taps, offsets -(k // 2) .. k // 2; weights normalised to 1;
            the time axis is padded by repeating the first and last frames (never wrapped).
        mask: None, or `(H, W)` / `(T, H, W)` float in [0, 1] (the feathered mouth mask):
            output = input + mask * (filtered - input); exactly the input where mask is 0.
        motion: None (each pixel smoothed in place), or `(T-1, H, W, 2)` float32 flow from
            each frame to the next (e.g. `ideal_flow`): each pixel smoothed along its motion.

    Returns:
        `(T, H, W, 3)` uint8.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape}")
    n = frames.shape[0]
    return temporal_filter_chunk(frames, noise_pattern, 0, n, n, kernel_size, mask, motion)


def mean_noise_pattern(noise_pattern: np.ndarray, mask: np.ndarray | None = None) -> float:
    """MNP: the noise pattern averaged over the mouth region, weighted by the mask.

    Args:
        noise_pattern: `(H, W)` or `(T, H, W)` float.
        mask: None (plain mean), `(H, W)` or `(T, H, W)` float in [0, 1].

    Returns:
        float, in the noise pattern's units; 0.0 for an all-zero mask.
    """
    pattern = np.asarray(noise_pattern, dtype=np.float64)
    if mask is None:
        return float(pattern.mean())
    weight = np.asarray(mask, dtype=np.float64)
    if pattern.ndim == 3 and weight.ndim == 2:
        weight = np.broadcast_to(weight, pattern.shape)
    elif pattern.ndim == 2 and weight.ndim == 3:
        pattern = np.broadcast_to(pattern, weight.shape)
    if weight.shape != pattern.shape:
        raise ValueError(f"mask {weight.shape} does not match noise_pattern {pattern.shape}")
    total = weight.sum()
    return float((pattern * weight).sum() / total) if total > 0 else 0.0


def noise_pattern_heatmap(noise_pattern: np.ndarray, vmax: float | None = None,
                          colormap: str = "inferno") -> np.ndarray:
    """Colour image of a noise pattern, for a PNG.

    Args:
        noise_pattern: `(H, W)` float.
        vmax: value mapped to the top of the colour map (default: the 99th percentile of the
            non-zero values, so that a few hot pixels do not wash out the rest).
        colormap: a matplotlib colour map name.

    Returns:
        `(H, W, 3)` uint8 RGB.
    """
    from matplotlib import colormaps

    pattern = np.asarray(noise_pattern, dtype=np.float64)
    if pattern.ndim != 2:
        raise ValueError(f"noise_pattern must be (H, W), got {pattern.shape}")
    if vmax is None:
        nonzero = pattern[pattern > 0]
        top = float(np.percentile(nonzero, 99)) if nonzero.size else 0.0
    else:
        top = float(vmax)
    scaled = np.clip(pattern / top, 0.0, 1.0) if top > 0 else np.zeros_like(pattern)
    rgba = colormaps[colormap](scaled, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])
