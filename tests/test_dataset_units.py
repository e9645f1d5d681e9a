"""The pieces of the dataset flow that need no cluster: the manifest, the per-worker model cache,
the task runner's shape."""

import re

import pytest

from freetalk_core.errors import FreetalkError


def test_manifest_ids_stay_text_and_paths_are_taken_from_its_folder(tmp_path):
    from flows.dataset import read_manifest

    (tmp_path / "clips").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_id,identity,lip_ref\n007,clips/a.mp4,/abs/b.mp4\n12,a.mp4,b.mp4\n")
    rows = read_manifest(manifest)
    assert [r["item_id"] for r in rows] == ["007", "12"]
    assert rows[0]["identity"] == str((tmp_path / "clips" / "a.mp4").resolve())
    assert rows[0]["lip_ref"] == "/abs/b.mp4"
    assert rows[0].get("audio") is None


@pytest.mark.parametrize("text, message", [("item_id,identity\nx,a.mp4\n", "lacks column(s) lip_ref"),
                                           ("item_id,identity,lip_ref\nx,a,b\nx,c,d\n", "repeats item_id")])
def test_a_bad_manifest_is_one_clear_error(tmp_path, text, message):
    from flows.dataset import read_manifest

    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(FreetalkError, match=re.escape(message)):
        read_manifest(tmp_path / "m.csv")


def test_row_problems_name_the_row_and_what_to_do():
    from flows.dataset import _row_problem

    assert _row_problem({"item_id": "ok-1", "identity": "a", "lip_ref": "b"}) is None
    assert "fix the manifest row" in _row_problem({"item_id": "a b", "identity": "a", "lip_ref": "b"})
    assert "has no lip_ref" in _row_problem({"item_id": "x", "identity": "a", "lip_ref": None})


def test_models_load_once_per_process_and_again_when_the_checkpoint_changes(tmp_path):
    from tasks import common

    (tmp_path / "part").mkdir()
    weights = tmp_path / "part" / "w.bin"
    weights.write_bytes(b"one")
    calls = []

    def loader():
        calls.append(1)
        return object()

    kind = f"test model {tmp_path.name}"
    first = common.load_cached(kind, loader, models=tmp_path, components=("part",), device="cpu")
    again = common.load_cached(kind, loader, models=tmp_path, components=("part",), device="cpu")
    assert first is again and len(calls) == 1
    assert common.model_loads()[kind] == 1
    other_device = common.load_cached(kind, loader, models=tmp_path, components=("part",), device="cuda")
    assert other_device is not first and common.model_loads()[kind] == 2
    weights.write_bytes(b"two, longer")  # another checkpoint in the same folder
    changed = common.load_cached(kind, loader, models=tmp_path, components=("part",), device="cpu")
    assert changed is not first and common.model_loads()[kind] == 3


def test_local_cluster_has_single_threaded_workers_that_declare_a_gpu_slot(monkeypatch):
    from flows.dataset import GPU, dataset_task_runner

    monkeypatch.delenv("FREETALK_DASK_ADDRESS", raising=False)
    runner = dataset_task_runner(workers=3)
    assert runner.cluster_kwargs["n_workers"] == 3 and runner.cluster_kwargs["threads_per_worker"] == 1
    assert runner.cluster_kwargs["resources"] == GPU
    remote = dataset_task_runner(address="tcp://10.0.0.5:8786")
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs
    monkeypatch.setenv("FREETALK_WORKERS", "5")
    assert dataset_task_runner().cluster_kwargs["n_workers"] == 5


def test_every_method_parameter_reaches_the_job_and_the_keys(monkeypatch, tmp_path, tiny_models):
    import inspect

    from typer.testing import CliRunner

    import flows.cli as cli
    from flows.dataset import process_dataset
    from flows.generate import generate_pair, make_job, stage_keys

    seen = {}
    monkeypatch.setattr(cli, "pair_job", lambda *args, **kwargs: seen.update(kwargs) or "job")
    monkeypatch.setattr(cli, "run_job", lambda job, out, **kwargs: out)
    for name in ("identity.mp4", "lip.mp4"):
        (tmp_path / name).write_bytes(b"\0")
    options = ["--faceid-variant", "plusv2", "--ip-scale", "0.7", "--lambda-range", "0.8", "1.25",
               "--noise-window", "50", "--kernel-size", "7"]
    result = CliRunner().invoke(cli.app, ["generate", str(tmp_path / "identity.mp4"), str(tmp_path / "lip.mp4"),
                                          "-o", str(tmp_path / "o.mp4"), "--models", str(tiny_models), *options])
    assert result.exit_code == 0, result.output
    assert {k: seen[k] for k in ("faceid_variant", "ip_adapter_scale", "lambda_range", "noise_window",
                                 "kernel_size")} == {"faceid_variant": "plusv2", "ip_adapter_scale": 0.7,
                                                     "lambda_range": (0.8, 1.25), "noise_window": 50,
                                                     "kernel_size": 7}
    bad = CliRunner().invoke(cli.app, ["generate", str(tmp_path / "identity.mp4"), str(tmp_path / "lip.mp4"),
                                       "-o", str(tmp_path / "o.mp4"), "--lambda-range", "2", "1"])
    assert bad.exit_code == 2 and "--lambda-range" in bad.output
    for flow in (process_dataset, generate_pair):
        assert {"faceid_variant", "ip_adapter_scale", "lambda_range", "noise_window"} <= set(
            inspect.signature(flow.fn).parameters)
    # Each reaches the key of the stage it changes, and the stages after it only.
    paths = dict(store=tmp_path / "store", models=tiny_models, check=False, fps=25.0)  # stand-in files
    base = stage_keys(make_job(tmp_path / "identity.mp4", tmp_path / "lip.mp4", **paths))
    first_changed = {}
    for name, value in (("faceid_variant", "plusv2"), ("ip_adapter_scale", 0.7), ("lambda_range", (0.8, 1.25)),
                        ("noise_window", 50)):
        keys = stage_keys(make_job(tmp_path / "identity.mp4", tmp_path / "lip.mp4", **paths, **{name: value}))
        first_changed[name] = next(stage for stage in base if keys[stage] != base[stage])
    assert first_changed == {"faceid_variant": "diffusion", "ip_adapter_scale": "diffusion",
                             "lambda_range": "controller", "noise_window": "noise_filter"}
