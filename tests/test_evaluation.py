"""Evaluation metrics with known answers, and a sample clip evaluated against itself."""

import math

import numpy as np
import pytest

from freetalk_core.evaluation.metrics import (
    aggregate,
    cosine_similarity,
    csim,
    lip_sync_metrics,
    pearson,
    procrustes_disparities,
)


def _face(open_by: float = 0.0, rng=None) -> np.ndarray:
    """A (68, 2) landmark set: eyes level at y = 100, a mouth around y = 200 opened by
    `open_by` px (lower lip moved down), small random irregularities."""
    rng = rng or np.random.default_rng(0)
    points = rng.uniform(50, 250, size=(68, 2))
    points[36:42] = [[90 + 5 * i, 100] for i in range(6)]
    points[42:48] = [[190 + 5 * i, 100] for i in range(6)]
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    points[48:60] = np.c_[150 + 40 * np.cos(angles), 200 + 15 * np.sin(angles)]
    inner = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    points[60:68] = np.c_[150 + 25 * np.cos(inner), 200 + 6 * np.sin(inner)]
    lower = [55, 56, 57, 58, 59, 65, 66, 67]
    points[lower, 1] += open_by
    return points + rng.normal(0, 0.3, size=points.shape)


def _clip(openings) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = _face(rng=rng)
    frames = []
    for h in openings:
        face = base.copy()
        face[[55, 56, 57, 58, 59, 65, 66, 67], 1] += h
        frames.append(face)
    return np.stack(frames)


def _similarity(points: np.ndarray, angle: float, scale: float, shift) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ (scale * np.array([[c, -s], [s, c]])).T + np.asarray(shift)


def test_pd_is_zero_for_identical_lips_and_ignores_rotation_scale_and_translation():
    lm = _clip([0, 4, 9, 3, 12, 1])
    assert np.allclose(procrustes_disparities(lm, lm), 0, atol=1e-12)
    moved = _similarity(lm, 0.4, 2.5, (37.0, -12.0))
    assert np.allclose(procrustes_disparities(moved, lm), 0, atol=1e-10)
    # A different mouth shape is not zero.
    other = _clip([8, 0, 2, 11, 0, 6])
    assert procrustes_disparities(other, lm).mean() > 1e-3


def test_pd_leaves_out_frames_without_landmarks():
    lm = _clip([0, 5, 10])
    missing = lm.copy()
    missing[1] = np.nan
    d = procrustes_disparities(missing, lm)
    assert np.isnan(d[1]) and np.allclose(d[[0, 2]], 0, atol=1e-12)
    assert lip_sync_metrics(missing, lm)["lip_frames"] == 2


def test_csld_and_pcld_are_one_for_the_same_motion_and_pcld_minus_one_for_its_negation():
    openings = [0, 4, 9, 3, 12, 1, 7]
    lm = _clip(openings)
    found = lip_sync_metrics(lm, lm)
    assert found["PD"] == pytest.approx(0, abs=1e-12)
    assert found["CSLD"] == pytest.approx(1) and found["PCLD"] == pytest.approx(1)
    # The same motion on a face twice the size, rotated and moved: lip opening is normalised.
    found = lip_sync_metrics(_similarity(lm, 0.3, 2.0, (10, 20)), lm)
    assert found["PCLD"] == pytest.approx(1) and found["CSLD"] == pytest.approx(1)
    seq = np.array([0.1, 0.4, 0.2, 0.9, 0.3])
    assert pearson(seq, -seq) == pytest.approx(-1)
    assert pearson(seq, seq) == pytest.approx(1) and cosine_similarity(seq, seq) == pytest.approx(1)
    assert cosine_similarity(seq, -seq) == pytest.approx(-1)
    assert math.isnan(pearson(seq, np.ones(5)))


def test_csim_and_aggregate():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 512))
    assert csim(a, a) == pytest.approx(1)
    assert csim(a, -a) == pytest.approx(-1)
    b = a.copy()
    b[2] = np.nan
    assert csim(b, a) == pytest.approx(1)
    assert aggregate({"x": {"PD": 1.0, "CSIM": math.nan}, "y": {"PD": 3.0, "CSIM": 0.5}}) == {"PD": 2.0, "CSIM": 0.5}


def test_cpbd_is_higher_for_a_sharp_image_than_for_its_blurred_copy():
    import cv2
    from skimage import data

    from freetalk_core.cpbd import cpbd

    sharp = data.astronaut()
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
    assert cpbd(sharp) > cpbd(blurred) + 0.05


def test_a_sample_clip_against_itself_gives_pd_zero_pcld_one_mnp_zero(samples_dir):
    """Self-reconstruction with nothing generated: the clip is its own output."""
    from freetalk_core import CROP_SIZE, flow, noise_sensor, video
    from freetalk_core.face_crop import (
        LandmarkDetector,
        crop_transforms,
        mouth_mask,
        transform_points,
        warp_to_crop,
    )

    frames = video.read_video(samples_dir / "SadTalker__WDA_KatieHill_000.mp4", fps=25.0, max_frames=25)
    detector = LandmarkDetector()
    landmarks = detector.detect_all(frames)
    assert np.isfinite(landmarks).all()
    transforms = crop_transforms(landmarks, CROP_SIZE)
    crops = np.stack([warp_to_crop(f, m, CROP_SIZE) for f, m in zip(frames, transforms)])
    crop_landmarks = detector.detect_all(crops)
    found = lip_sync_metrics(crop_landmarks, crop_landmarks)
    assert found["PD"] == pytest.approx(0, abs=1e-12) and found["PCLD"] == pytest.approx(1)
    assert found["lip_frames"] == len(frames)
    # The lips really move in this clip, so PCLD = 1 is not a constant's NaN turned into 1.
    assert lip_sync_metrics(crop_landmarks[::-1], crop_landmarks)["PCLD"] < 0.9

    masks = np.stack([mouth_mask(lm, CROP_SIZE) for lm in transform_points(landmarks, transforms[:, None])])
    x0, y0, x1, y1 = flow.mouth_box(masks.max(axis=0) > 0)
    flows = flow.optical_flow(crops[:, y0:y1, x0:x1])
    read = lambda start, stop: (flows[start:stop], flows[start:stop])  # noqa: E731 - a FlowReader
    pattern = noise_sensor.clip_noise_pattern(read, len(flows), len(flows))
    mnp = noise_sensor.mean_noise_pattern(pattern, masks.mean(axis=0)[y0:y1, x0:x1])
    assert mnp == pytest.approx(0, abs=1e-9)
    # Against a jittered copy of itself the same measure is not zero.
    noisy = np.clip(crops.astype(np.int16) + np.random.default_rng(0).integers(-20, 21, crops.shape), 0, 255)
    jittered = flow.optical_flow(noisy.astype(np.uint8)[:, y0:y1, x0:x1])
    read = lambda start, stop: (jittered[start:stop], flows[start:stop])  # noqa: E731
    pattern = noise_sensor.clip_noise_pattern(read, len(flows), len(flows))
    assert noise_sensor.mean_noise_pattern(pattern, masks.mean(axis=0)[y0:y1, x0:x1]) > 1e-4


# ---------------------------------------------------------------------------------------------
# `freetalk evaluate` on a store the tiny-model flow made


@pytest.fixture(scope="module")
def evaluated_store(tmp_path_factory, tiny_models, samples_dir):
    """A store with a cross-driving item (KatieHill <- May) and a self-reconstruction item
    (KatieHill <- KatieHill), 1 s each, then `freetalk evaluate STORE -o REPORT`."""
    import os
    import subprocess
    import sys

    from flows.generate import generate_to, make_job
    from flows.runtime import configure_environment, store_settings
    from freetalk_core import video

    folder = tmp_path_factory.mktemp("eval")
    clips = {}
    for name in ("SadTalker__WDA_KatieHill_000.mp4", "MimicTalk__May_5s.mp4"):
        source = samples_dir / name
        clips[name] = folder / name
        video.write_video(clips[name], iter(video.read_video(source, fps=25.0, max_frames=25)), 25.0, audio=source)
    store = folder / "store"
    configure_environment()
    katie, may = clips["SadTalker__WDA_KatieHill_000.mp4"], clips["MimicTalk__May_5s.mp4"]
    with store_settings(store):
        for item, (identity, lip_ref) in {"cross": (katie, may), "self": (katie, katie)}.items():
            job = make_job(identity, lip_ref, store=store, models=tiny_models, item_id=item, steps=2,
                           batch_size=4, chunk_frames=10)
            generate_to(job, folder / f"{item}.mp4")
    report = folder / "report"
    run = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", str(store), "-o", str(report)],
                         capture_output=True, text=True, env={**os.environ, "FREETALK_MODELS": str(tiny_models)},
                         timeout=900)
    return store, report, run


def test_evaluate_writes_every_metric_per_item_and_the_aggregate(evaluated_store):
    from storage import Store

    store, _, run = evaluated_store
    assert run.returncode == 0, run.stderr
    metrics = Store(store).metrics()
    both = {"PD", "CSLD", "PCLD", "structure_PD", "structure_CSLD", "structure_PCLD", "CPBD", "MNP_before",
            "MNP_after", "FID", "CSIM", "LSE_C", "LSE_D"}
    for item in ("cross", "self"):
        assert both <= set(metrics[item]), sorted(both - set(metrics[item]))
        assert all(math.isfinite(v) for v in metrics[item].values())
        assert 0 <= metrics[item]["PD"] < 1 and -1 <= metrics[item]["PCLD"] <= 1
    # LPIPS needs a ground truth: the self-reconstruction item only.
    assert "LPIPS" in metrics["self"] and "LPIPS" not in metrics["cross"]
    assert metrics["self"]["LPIPS"] > 0
    assert "PD" in metrics["_aggregate"] and "FID" in metrics["_aggregate"]
    # The aggregate PD is the mean of the items'.
    assert metrics["_aggregate"]["PD"] == pytest.approx((metrics["cross"]["PD"] + metrics["self"]["PD"]) / 2)
    # The tiny models are named in the command's output.
    assert "TINY RANDOM-WEIGHT MODELS" in run.stderr and "PD" in run.stdout


def test_the_report_page_renders_in_chromium_with_tables_figures_and_the_tiny_warning(evaluated_store, tmp_path):
    import shutil
    import subprocess

    import cv2

    _, report, run = evaluated_store
    page = report / "index.html"
    html = page.read_text()
    assert "TINY RANDOM-WEIGHT MODELS" in html and "paper HDTF" in html
    assert html.count("data:image/png;base64,") == 6  # per item: lip curves, noise patterns, frame strip
    for item in ("cross", "self"):
        for name in ("lip_opening.png", "noise_patterns.png", "frame_strip.png"):
            assert (report / "items" / item / name).stat().st_size > 1000
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: .ci/setup installs the Debian package `chromium`")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (1600, 1280)
    assert image.std() > 20  # not blank
    # The warning banner (white on #bb0000) is on screen.
    red = (image[..., 2] > 150) & (image[..., 1] < 40) & (image[..., 0] < 40)
    assert red.sum() > 5000
    print(f"report screenshot: {shot}")


def test_the_evaluate_run_has_a_table_and_a_markdown_artifact(evaluated_store, prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            async with get_client() as client:
                return {key: await client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": [key]}))
                        for key in ("freetalk-evaluation", "freetalk-evaluation-items")}

    found = asyncio.run(read())
    markdown, table = found["freetalk-evaluation"], found["freetalk-evaluation-items"]
    assert markdown and table
    assert markdown[0].type == "markdown" and "paper HDTF" in markdown[0].data
    assert "TINY RANDOM-WEIGHT MODELS" in markdown[0].data
    assert table[0].type == "table" and "cross" in str(table[0].data) and "PCLD" in str(table[0].data)
