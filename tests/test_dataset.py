"""`freetalk dataset` on a Dask cluster of 2 workers against a real Prefect server: what the API
shows, failure isolation, a SIGKILL and the resume, and `prefect deploy --all`.

Clips are 10 frames (0.4 s) and diffusion runs 2 steps without guidance so that four items, and
a killed and resumed run of two, fit the test budget of a 2-core machine."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from freetalk_core.video import media_sha256
from storage import STAGES, Store

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [f"item-{i}" for i in range(4)]
FRAMES = 10
OPTIONS = ["--steps", "2", "--guidance", "1", "--batch-size", "5"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory, samples_dir):
    """Four different pairs (different start frames of two people), and four rows that fail: a
    bad item id, a missing file, a video with no face, a file that is not a video."""
    import numpy as np

    from freetalk_core import video

    folder = tmp_path_factory.mktemp("clips")
    identity = video.read_video(samples_dir / "SadTalker__WDA_KatieHill_000.mp4", fps=25.0, max_frames=40)
    lip_ref = video.read_video(samples_dir / "MimicTalk__May_5s.mp4", fps=25.0, max_frames=40)
    rows = ["item_id,identity,lip_ref"]
    for i, item in enumerate(ITEMS):
        start = 7 * i
        video.write_video(folder / f"identity{i}.mp4", iter(identity[start:start + FRAMES]), 25.0)
        video.write_video(folder / f"lip{i}.mp4", iter(lip_ref[start:start + FRAMES]), 25.0,
                          audio=samples_dir / "MimicTalk__May_5s.mp4")
        rows.append(f"{item},identity{i}.mp4,lip{i}.mp4")
    video.write_video(folder / "blank.mp4", iter(np.full((FRAMES, 128, 128, 3), 90, np.uint8)), 25.0)
    (folder / "garbage.mp4").write_bytes(b"this is not a video")
    (folder / "good.csv").write_text("\n".join(rows[:3]) + "\n")  # two items for the SIGKILL test
    full = folder / "manifest.csv"
    full.write_text("\n".join(rows + ["a b,identity0.mp4,lip0.mp4", "missing,nowhere.mp4,lip1.mp4",
                                      "no-face,blank.mp4,lip1.mp4", "garbage,garbage.mp4,lip1.mp4"]) + "\n")
    return folder


def _env(api: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api}
    env.pop("PREFECT_LOGGING_LEVEL", None)  # the CLI's own settings: INFO to the API, quiet console
    return env


def _dataset(api, manifest, store, models, *extra, workers=2, **popen):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "dataset", str(manifest), "--store", str(store),
                             "--models", str(models), "--workers", str(workers), *OPTIONS, *extra],
                            cwd=ROOT, env=_env(api),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("failed: ")]


@pytest.fixture(scope="module")
def first_run(prefect_server, tiny_models, clips, tmp_path_factory):
    store = tmp_path_factory.mktemp("run") / "store"
    start = time.perf_counter()
    code, out, err = _finish(_dataset(prefect_server, clips / "manifest.csv", store, tiny_models))
    return store, code, out, err, time.perf_counter() - start


def _api(prefect_server, coroutine):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run():
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            async with get_client() as client:
                return await coroutine(client)

    return asyncio.run(run())


async def _read_run(client):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter

    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["dataset[manifest]"])))
    assert len(runs) >= 1
    run = runs[0]
    in_run = FlowRunFilter(id={"any_": [run.id]})
    tasks = await client.read_task_runs(flow_run_filter=in_run)
    logs = []
    offset = 0
    while True:
        page = await client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}), offset=offset)
        logs += page
        offset += len(page)
        if not page:
            break
    artifacts = await client.read_artifacts(flow_run_filter=in_run)
    return run, tasks, logs, artifacts


def test_dataset_runs_on_two_workers_and_the_api_shows_every_item(prefect_server, first_run):
    store_dir, code, out, err, seconds = first_run
    # failures: one line each on stderr, the exit status says so, every other item is done
    assert code == 1, err[-3000:]
    lines = _failure_lines(err)
    assert [line.split(":")[1].strip() for line in lines] == ["a b", "garbage", "missing", "no-face"], err[-3000:]
    assert "item_id" in lines[0] and "garbage.mp4" in lines[1] and "nowhere.mp4" in lines[2]
    assert "no face found" in lines[3]
    assert "4 done, 4 failed" in out
    store = Store(store_dir)
    for item in ITEMS:
        row = store.item(item)
        assert row["status"] == "done" and Path(row["output"]).is_file()
    for item, reason in (("missing", "nowhere.mp4"), ("no-face", "no face found"), ("garbage", "garbage.mp4")):
        assert store.item(item)["status"] == "failed"
        assert reason in store.item(item)["error"] and "\n" not in store.item(item)["error"]
    # the failed stage row says why, too
    failed_rows = [r for r in store.stage_rows("no-face") if r["status"] == "failed"]
    assert failed_rows and failed_rows[0]["stage"] == "face_crop"

    run, tasks, logs, artifacts = _api(prefect_server, _read_run)
    assert run.state.is_completed()
    names = {t.name: t for t in tasks}
    for item in ITEMS:
        for stage in STAGES:
            task = names[f"{stage}[{item}]"]
            assert task.state.is_completed(), (task.name, task.state)
            # every stage's task run has its own log lines in the API
            assert any(log.task_run_id == task.id for log in logs), task.name
        for unit in ("prepare", "diffusion-item", "finish"):
            assert names[f"{unit}[{item}]"].state.is_completed()
    messages = [log.message for log in logs]
    loads = [m for m in messages if m.startswith("loaded diffusion pipeline")]
    assert 1 <= len(loads) <= 2 and all("load 1 of diffusion pipeline" in m for m in loads)
    assert any("failed" in m and "nowhere.mp4" in m for m in messages)

    by_key = {}
    for artifact in sorted(artifacts, key=lambda a: a.created):
        by_key[artifact.key] = artifact  # the latest version of each
    assert by_key["manifest-progress"].data == 100
    table = by_key["manifest-items"].data
    table = __import__("json").loads(table) if isinstance(table, str) else table
    status = {row["item_id"]: row["status"] for row in table}
    assert status == {**{i: "done" for i in ITEMS}, **{i: "failed" for i in ("a b", "missing", "no-face", "garbage")}}
    assert all(row["seconds"] > 0 and row["output"] for row in table if row["status"] == "done")
    loads_table = by_key["manifest-model-loads"].data
    loads_table = __import__("json").loads(loads_table) if isinstance(loads_table, str) else loads_table
    assert 1 <= len({row["worker"] for row in loads_table}) <= 2  # the workers that loaded anything
    assert all(row["loads"] == 1 for row in loads_table), loads_table  # each model once per worker
    assert {row["model"] for row in loads_table} >= {"diffusion pipeline", "image encoder", "landmark detector"}
    print(f"dataset of 4 items on 2 workers: {seconds:.0f} s")


def test_a_bad_item_id_is_recorded_failed_in_the_store(first_run):
    store = Store(first_run[0])
    assert store.item("a b")["status"] == "failed"
    assert "item_id" in store.item("a b")["error"]


def test_failed_items_are_skipped_on_rerun_and_retried_with_retry_failed(prefect_server, first_run, clips,
                                                                         tiny_models):
    store = Store(first_run[0])
    rows_before = len(store.stage_rows())
    failed_at = store.item("missing")["updated_at"]
    code, out, err = _finish(_dataset(prefect_server, clips / "manifest.csv", store.root, tiny_models,
                                      "--evaluate", workers=1))
    assert code == 1
    lines = _failure_lines(err)
    assert len(lines) == 4 and all("failed before" in line and "--retry-failed" in line for line in lines[1:])
    assert store.item("missing")["updated_at"] == failed_at  # skipped, not tried
    assert len(store.stage_rows()) == rows_before  # the done items did not run again
    # --evaluate: every done item measured, the failed ones listed as not done, the report written
    metrics = store.metrics()
    assert all({"PD", "PCLD", "CPBD", "MNP_after", "CSIM"} <= set(metrics[item]) for item in ITEMS)
    assert "4 evaluated, 0 not evaluated" in out and "4 item(s) not done, not evaluated" in err
    assert (store.root / "evaluation" / "index.html").is_file()

    code, out, err = _finish(_dataset(prefect_server, clips / "manifest.csv", store.root, tiny_models,
                                      "--retry-failed", workers=1))
    assert code == 1
    lines = _failure_lines(err)
    assert len(lines) == 4 and "nowhere.mp4" in lines[2] and not any("failed before" in line for line in lines)
    assert store.item("missing")["updated_at"] > failed_at  # tried again, failed again
    assert "4 done, 4 failed" in out


def test_items_a_live_run_is_processing_are_left_to_it(prefect_server, first_run, clips, tiny_models):
    store = Store(first_run[0])
    rows_before = len(store.stage_rows())
    with store.run("generate") as run_id:  # this test process: a live run with a fresh heartbeat
        store.record_item("item-0", "running")
        code, out, err = _finish(_dataset(prefect_server, clips / "good.csv", store.root, tiny_models,
                                          workers=1))
    store.record_item("item-0", "done")
    assert code == 0, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("skipped: ")] == [
        f"skipped: item-0: another live run ({run_id}) is processing it; rerun once that run has ended"]
    assert "1 done, 0 failed, 1 held by another run" in out
    assert len(store.stage_rows()) == rows_before


def _done_rows(store: Store) -> Counter:
    """Done rows per (item, stage, chunk), over every row ever written, not only the latest."""
    rows = store._read("stages").to_pylist()
    return Counter((r["item_id"], r["stage"], r["chunk"]) for r in rows if r["status"] == "done")


def test_sigkill_of_the_whole_run_then_rerun_computes_nothing_twice(prefect_server, first_run, clips,
                                                                    tiny_models, tmp_path):
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    process = _dataset(prefect_server, clips / "good.csv", store_dir, tiny_models, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(1)
        if (store_dir / "metadata" / "stages").is_dir():
            done = _done_rows(store)
            if any(stage == "diffusion" for _, stage, _ in done):
                break
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the CLI, the Dask scheduler and both workers
    process.communicate()
    killed_at = _done_rows(store)
    states = {row["item_id"]: row["status"] for row in store.items()}
    assert "running" not in states.values() and "interrupted" in states.values(), states
    reference = Store(first_run[0])
    assert 0 < len(killed_at) < sum(1 for key in _done_rows(reference) if key[0] in ITEMS[:2])

    code, out, err = _finish(_dataset(prefect_server, clips / "good.csv", store_dir, tiny_models))
    assert code == 0, err[-3000:]
    done = _done_rows(store)
    assert max(done.values()) == 1, [k for k, n in done.items() if n > 1]  # no chunk computed twice
    assert {stage for _, stage, _ in done} == set(STAGES)
    for item in ITEMS[:2]:
        assert store.item(item)["status"] == "done"
        # The same encoded media; the signed manifests differ only in their signing time and ids.
        assert media_sha256(store.item(item)["output"]) == media_sha256(reference.item(item)["output"])

    # Two rows added to the manifest: only those two run.
    grown = tmp_path / "grown.csv"
    grown.write_text("item_id,identity,lip_ref\n" + "".join(f"{item},{clips}/identity{i}.mp4,{clips}/lip{i}.mp4\n"
                                                          for i, item in enumerate(ITEMS)))
    code, out, err = _finish(_dataset(prefect_server, grown, store_dir, tiny_models))
    assert code == 0, err[-3000:]
    new = _done_rows(store) - done
    assert {item for item, _, _ in new} == set(ITEMS[2:]) and max(new.values()) == 1
    assert {stage for _, stage, _ in new} == set(STAGES)


def test_a_changed_setting_reruns_done_items_from_the_stage_it_affects(prefect_server, first_run, clips,
                                                                      tiny_models, tmp_path):
    shutil.copytree(first_run[0], tmp_path / "store")
    store = Store(tmp_path / "store")
    before = _done_rows(store)
    code, out, err = _finish(_dataset(prefect_server, clips / "good.csv", store.root, tiny_models,
                                      "--kernel-size", "3", workers=1))
    assert code == 0, err[-3000:]
    new = _done_rows(store) - before
    assert {(item, stage) for item, stage, _ in new} == {(i, "noise_filter") for i in ITEMS[:2]}
    assert max(new.values()) == 1
    for item in ITEMS[:2]:
        assert store.item(item)["status"] == "done" and Path(store.item(item)["output"]).is_relative_to(store.root)
    # The same setting again: nothing runs.
    after = _done_rows(store)
    code, out, err = _finish(_dataset(prefect_server, clips / "good.csv", store.root, tiny_models,
                                      "--kernel-size", "3", workers=1))
    assert code == 0 and _done_rows(store) == after, err[-3000:]


def test_prefect_deploy_all_registers_both_deployments(prefect_server, tmp_path):
    env = {**_env(prefect_server), "FREETALK_MANIFEST": str(tmp_path / "manifest.csv"),
           "FREETALK_STORE": str(tmp_path / "store"), "FREETALK_MODELS": str(tmp_path / "models")}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "freetalk", "--type", "process", "--overwrite"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    before = (ROOT / "prefect.yaml").read_text()
    result = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (ROOT / "prefect.yaml").read_text() == before

    async def read(client):
        return {d.name: d for d in await client.read_deployments()}

    deployments = _api(prefect_server, read)
    dataset = deployments["process-dataset"]
    assert dataset.work_pool_name == "freetalk" and dataset.entrypoint == "flows/dataset.py:process_dataset"
    assert dataset.parameters["store"] == str(tmp_path / "store")
    assert [s.schedule.cron for s in dataset.schedules] == ["0 2 * * *"]
    assert deployments["generate-pair"].entrypoint == "flows/generate.py:generate_pair"
