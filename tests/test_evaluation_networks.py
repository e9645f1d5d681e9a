"""The learned-network metrics (FID, FVD, LPIPS, LSE-D / LSE-C) on tiny random-weight networks in
the real file formats, read through the loaders the real files go through."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freetalk_core import models
from freetalk_core.errors import ModelFileError
from freetalk_core.evaluation import networks, syncnet
from freetalk_core.models import check, layout, tiny

# Key sets of the real files, as the reference code defines them.
# torchvision alexnet(): features = Conv(0) ReLU Pool Conv(3) ReLU Pool Conv(6) ReLU Conv(8) ReLU
# Conv(10) ReLU Pool; classifier = Dropout Linear(1) ReLU Dropout Linear(4) ReLU Linear(6).
ALEXNET_KEYS = {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")} | {
    f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")}
# lpips NetLinLayer: Sequential(Dropout, Conv2d(bias=False)) per layer, lin0..lin4 for alex.
LPIPS_KEYS = {f"lin{i}.model.1.weight" for i in range(5)}
# syncnet_python SyncNetModel.S: convolutions and BatchNorms of each tower by Sequential index;
# the released file has no num_batches_tracked counters.
_AUD_CONV, _AUD_BN = (0, 4, 8, 11, 14, 18), (1, 5, 9, 12, 15, 19)
_LIP_CONV, _LIP_BN = (0, 4, 8, 11, 14, 18), (1, 5, 9, 12, 15, 19)
SYNCNET_KEYS = (
    {f"{tower}.{i}.{p}" for tower, convs in (("netcnnaud", _AUD_CONV), ("netcnnlip", _LIP_CONV))
     for i in convs for p in ("weight", "bias")}
    | {f"{tower}.{i}.{p}" for tower, bns in (("netcnnaud", _AUD_BN), ("netcnnlip", _LIP_BN))
       for i in bns for p in ("weight", "bias", "running_mean", "running_var")}
    | {f"{fc}.{i}.{p}" for fc in ("netfcaud", "netfclip") for i in (0, 3) for p in ("weight", "bias")}
    | {f"{fc}.1.{p}" for fc in ("netfcaud", "netfclip") for p in ("weight", "bias", "running_mean", "running_var")}
)
ROLES = ("inception", "i3d", "alexnet", "lpips_alex", "syncnet")


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    """A models directory holding only the tiny evaluation networks."""
    root = tmp_path_factory.mktemp("eval") / "models"
    tiny.write_tiny_evaluation_models(root)
    return root


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 48, 64, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    return a, noisy


def test_frechet_distance_known_answers():
    # Commuting covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2 = 5 + (1 - 2)^2 + (2 - 3)^2.
    value = networks.frechet_distance((np.zeros(2), np.diag([1.0, 4.0])), (np.array([1.0, 2.0]), np.diag([4.0, 9.0])))
    assert value == pytest.approx(7.0, abs=1e-9)
    # Identity against A = [[2, 1], [1, 2]] (eigenvalues 3 and 1): 1 + 2 + 4 - 2 (sqrt 3 + 1).
    value = networks.frechet_distance((np.zeros(2), np.eye(2)), (np.array([1.0, 0.0]), np.array([[2.0, 1.0], [1.0, 2.0]])))
    assert value == pytest.approx(7 - 2 * (np.sqrt(3) + 1), abs=1e-9)


def test_frechet_distance_of_features_matches_the_sqrtm_formula():
    """pytorch-fid's calculate_frechet_distance on the same statistics."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((30, 6)) * 2 + 1
    mu1, s1 = networks.feature_statistics(a)
    mu2, s2 = networks.feature_statistics(b)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert networks.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert networks.frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)
    # Fewer samples than dimensions (singular covariances), the FID case of a short clip.
    wide_a, wide_b = rng.standard_normal((5, 50)), rng.standard_normal((7, 50)) + 0.5
    from_features = networks.frechet_distance(wide_a, wide_b)
    from_stats = networks.frechet_distance(networks.feature_statistics(wide_a), networks.feature_statistics(wide_b))
    assert from_features == pytest.approx(from_stats, rel=1e-7) and from_features > 0


def test_fid_self_is_zero_and_different_sets_differ(eval_models, frames):
    a, noisy = frames
    features = networks.inception_features(a, eval_models)
    assert features.shape == (len(a), networks.INCEPTION_FEATURES)
    assert networks.fid(a, a, eval_models) == pytest.approx(0.0, abs=1e-9)
    assert networks.fid(a, noisy, eval_models) > 1e-4
    assert networks.fid(a, 255 - a, eval_models) > networks.fid(a, noisy, eval_models)


def test_fvd_self_is_zero_and_runs_on_clips(eval_models):
    rng = np.random.default_rng(2)
    videos = [rng.integers(0, 256, (40, 40, 56, 3), dtype=np.uint8) for _ in range(2)]
    features = networks.i3d_features(videos, eval_models)
    assert features.shape == (4, networks.I3D_FEATURES)  # two whole 16-frame clips per video
    assert networks.fvd(videos, videos, eval_models) == pytest.approx(0.0, abs=1e-9)
    assert networks.fvd(videos, [v[:, ::-1] // 2 for v in videos], eval_models) > 1e-4
    with pytest.raises(ValueError, match="16 frames"):
        networks.fvd([videos[0][:10]], videos, eval_models)


def _reference_lpips(x0, x1, alex, heads):
    """lpips.LPIPS(net='alex', version='0.1') written out with the files' tensors."""
    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]

    def trunk(x):
        x = (x - shift) / scale
        x = F.relu(F.conv2d(x, alex["features.0.weight"], alex["features.0.bias"], stride=4, padding=2))
        h1 = x
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), alex["features.3.weight"], alex["features.3.bias"], padding=2))
        h2 = x
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), alex["features.6.weight"], alex["features.6.bias"], padding=1))
        h3 = x
        x = F.relu(F.conv2d(x, alex["features.8.weight"], alex["features.8.bias"], padding=1))
        h4 = x
        x = F.relu(F.conv2d(x, alex["features.10.weight"], alex["features.10.bias"], padding=1))
        return h1, h2, h3, h4, x

    def unit(t):
        return t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10)

    value = 0
    for k, (f0, f1) in enumerate(zip(trunk(x0), trunk(x1))):
        value = value + F.conv2d((unit(f0) - unit(f1)) ** 2, heads[f"lin{k}.model.1.weight"]).mean([2, 3])
    return value.reshape(-1)


def test_lpips_zero_for_equal_frames_and_matches_lpips(eval_models, frames):
    a, noisy = frames
    assert networks.lpips(a, a, eval_models) == 0.0
    value = networks.lpips(a, noisy, eval_models)
    folder = eval_models / layout.EVALUATION_DIR
    alex = torch.load(folder / "alexnet-owt-7be5be79.pth", weights_only=True)
    heads = torch.load(folder / "lpips_alex_v0.1.pth", weights_only=True)
    x0 = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    x1 = torch.from_numpy(noisy).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = float(_reference_lpips(x0, x1, alex, heads).mean())
    assert value > 0 and value == pytest.approx(expected, rel=1e-5)


def test_lse_runs_through_the_loader(eval_models):
    rng = np.random.default_rng(3)
    faces = rng.integers(0, 256, (12, 80, 72, 3), dtype=np.uint8)
    audio = rng.standard_normal(22050 * 12 // 30) * 0.1
    result = syncnet.lse(faces, 30.0, audio, 22050, eval_models)
    assert set(result) == {"LSE_D", "LSE_C", "offset"}
    assert np.isfinite(result["LSE_D"]) and np.isfinite(result["LSE_C"]) and result["LSE_C"] >= 0
    assert -syncnet.VSHIFT <= result["offset"] <= syncnet.VSHIFT
    with pytest.raises(ValueError, match="at least 6 frames"):
        syncnet.lse(faces[:5], 25.0, audio, 22050, eval_models)


def _reference_calc_pdist(feat1, feat2, vshift):
    """syncnet_python's calc_pdist, minval, conf and offset."""
    win_size = vshift * 2 + 1
    feat2p = F.pad(feat2, (0, 0, vshift, vshift))
    dists = [F.pairwise_distance(feat1[[i], :].repeat(win_size, 1), feat2p[i:i + win_size, :]) for i in range(len(feat1))]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return float(minval), float(torch.median(mdist) - minval), int(vshift - minidx)


def test_lse_is_syncnet_python_evaluate(eval_models):
    """SyncNetInstance.evaluate's tensors (after its 25 fps / 16 kHz conversion and face crops),
    fed to the same network."""
    import cv2
    import python_speech_features

    rng = np.random.default_rng(4)
    faces = rng.integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    audio = rng.standard_normal(16000 * 11 // 25) * 0.2
    result = syncnet.lse(faces, 25.0, audio, 16000, eval_models)
    model = syncnet.load_syncnet(eval_models)
    images = [cv2.resize(np.ascontiguousarray(f[:, :, ::-1]), (224, 224)) for f in faces]  # as cv2.imread gives BGR
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)
    im = np.transpose(np.expand_dims(np.stack(images, axis=3), axis=0), (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    mfcc = np.stack([np.array(i) for i in zip(*python_speech_features.mfcc(pcm, 16000))])
    cct = torch.from_numpy(np.expand_dims(np.expand_dims(mfcc, axis=0), axis=0).astype(float)).float()
    lastframe = min(len(images), len(pcm) // 640) - 5
    with torch.no_grad():
        im_feat = model.forward_lip(torch.cat([imtv[:, :, v:v + 5, :, :] for v in range(lastframe)], 0))
        cc_feat = model.forward_aud(torch.cat([cct[:, :, :, v * 4:v * 4 + 20] for v in range(lastframe)], 0))
    minval, conf, offset = _reference_calc_pdist(im_feat, cc_feat, 15)
    assert result["LSE_D"] == pytest.approx(minval, rel=1e-5)
    assert result["LSE_C"] == pytest.approx(conf, rel=1e-4, abs=1e-4)
    assert result["offset"] == offset


def test_sync_scores_follow_syncnet_python():
    torch.manual_seed(0)
    audio = torch.randn(60, 16)
    video = torch.roll(audio, -3, dims=0) + 0.01 * torch.randn(60, 16)  # video window i = audio window i + 3
    scores = syncnet.sync_scores(syncnet.sync_distances(video, audio, 15), 15)
    minval, conf, offset = _reference_calc_pdist(video, audio, 15)
    assert scores["LSE_D"] == pytest.approx(minval, rel=1e-5)
    assert scores["LSE_C"] == pytest.approx(conf, rel=1e-5)
    assert scores["offset"] == offset == -3
    assert scores["LSE_C"] > 1.0


def test_retiming_and_audio_preparation():
    frames = np.arange(30)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    retimed = syncnet.resample_frames(frames.astype(np.uint8), 30.0)
    assert len(retimed) == 25 and list(retimed[:7, 0, 0, 0]) == [0, 1, 2, 4, 5, 6, 7]
    assert syncnet.resample_frames(frames, 25.0) is frames
    pcm = syncnet.pcm16_at_16k(np.full(4410, 0.5), 44100)
    assert pcm.dtype == np.int16 and len(pcm) == 1600 and abs(int(pcm[800]) - 16384) <= 2
    cepstra = syncnet.mfcc(syncnet.pcm16_at_16k(np.zeros(640 * 10), 16000) + 1)
    assert cepstra.shape == (13, 4 * 10 - 1)  # 100 Hz: four MFCC frames per 25 fps video frame


def test_state_dict_keys_are_the_real_files(eval_models):
    folder = eval_models / layout.EVALUATION_DIR
    assert set(torch.load(folder / "alexnet-owt-7be5be79.pth", weights_only=True)) == ALEXNET_KEYS
    assert set(torch.load(folder / "lpips_alex_v0.1.pth", weights_only=True)) == LPIPS_KEYS
    assert set(torch.load(folder / "syncnet_v2.model", weights_only=True)) == SYNCNET_KEYS
    assert set(networks.lpips_head_shapes()) == LPIPS_KEYS
    assert set(syncnet.syncnet_shapes()) == SYNCNET_KEYS
    assert set(networks.alexnet_feature_shapes()) == {k for k in ALEXNET_KEYS if k.startswith("features.")}
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 4e6


@pytest.mark.parametrize("role", ROLES)
def test_a_missing_file_is_one_line_naming_it(eval_models, tmp_path, role):
    target = tmp_path / "models"
    shutil.copytree(eval_models, target)
    name = layout.EVALUATION_FILES[role]["file"]
    (target / layout.EVALUATION_DIR / name).unlink()
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    call = {
        "inception": lambda: networks.fid(frames, frames, target),
        "i3d": lambda: networks.fvd(np.zeros((16, 32, 32, 3), np.uint8), np.zeros((16, 32, 32, 3), np.uint8), target),
        "alexnet": lambda: networks.lpips(frames, frames, target),
        "lpips_alex": lambda: networks.lpips(frames, frames, target),
        "syncnet": lambda: syncnet.lse(np.zeros((8, 32, 32, 3), np.uint8), 25, np.zeros(16000), 16000, target),
    }[role]
    with pytest.raises(ModelFileError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and name in message and layout.EVALUATION_FILES[role]["url"] in message


def test_models_check_lists_them_as_optional(tiny_models, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(tiny_models, target, symlinks=True)
    assert models.check_models(target) == []
    text = models.format_description(target)
    for entry in layout.EVALUATION_FILES.values():
        assert f"[ok] evaluation/{entry['file']}" in text
    shutil.rmtree(target / layout.EVALUATION_DIR)
    assert models.check_models(target) == []
    text = models.format_description(target)
    for entry in layout.EVALUATION_FILES.values():
        line = next(line for line in text.splitlines() if f"evaluation/{entry['file']}" in line)
        assert line.lstrip().startswith("[--]") and "missing, optional" in line
    assert all(e.optional and not e.present for e in check.describe_evaluation_models(target))
    assert all(e.present for e in models.describe_models(target))


def test_models_check_reports_a_wrong_evaluation_file(eval_models, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(eval_models, target)
    folder = target / layout.EVALUATION_DIR
    state = torch.load(folder / "syncnet_v2.model", weights_only=True)
    state["netcnnlip.0.weight"] = torch.zeros(96, 1, 5, 7, 7)  # a grey-input SyncNet, not the released one
    torch.save(state, folder / "syncnet_v2.model")
    (folder / "inception-2015-12-05.pt").write_bytes((folder / "inception-2015-12-05.pt").read_bytes()[:1000])
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, folder / "lpips_alex_v0.1.pth")
    problems = check.check_evaluation_models(target)
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert "syncnet_v2.model has netcnnlip.0.weight of shape (96, 1, 5, 7, 7)" in problems[2]
    assert "inception-2015-12-05.pt" in problems[0] and "lpips_alex_v0.1.pth lacks 4 key(s)" in problems[1]
    with pytest.raises(ModelFileError, match="netcnnlip.0.weight"):
        syncnet.lse(np.zeros((8, 32, 32, 3), np.uint8), 25, np.zeros(16000), 16000, target)
