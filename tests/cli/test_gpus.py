"""Which workers ``neoxq up``/``neoxq run`` start (cli/gpus.py): pure planning, no GPU."""

from __future__ import annotations

import pytest

from cli.gpus import parse_gpus, plan_workers, visible_gpus


def test_one_worker_per_gpu_each_seeing_only_its_own() -> None:
    plan = plan_workers(gpus=["0", "1", "2", "3"])
    assert [w.name for w in plan] == ["worker-0", "worker-1", "worker-2", "worker-3"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0", "1", "2", "3"]


def test_pipeline_groups_of_consecutive_gpus() -> None:
    plan = plan_workers(gpus=["0", "1", "2", "3"], pipeline_parallel=2)
    assert [w.gpus for w in plan] == [("0", "1"), ("2", "3")]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0,1", "2,3"]
    [one] = plan_workers(gpus=["4", "5"], pipeline_parallel=2)
    assert one.name == "worker" and one.env["CUDA_VISIBLE_DEVICES"] == "4,5"
    with pytest.raises(ValueError, match="groups of --pipeline-parallel 2"):
        plan_workers(gpus=["0", "1", "2"], pipeline_parallel=2)


def test_fewer_workers_than_groups_and_not_more() -> None:
    assert [w.gpus for w in plan_workers(gpus=["0", "1", "2"], workers=2)] == [("0",), ("1",)]
    with pytest.raises(ValueError, match="only 3 group"):
        plan_workers(gpus=["0", "1", "2"], workers=4)


def test_cpu_workers_hide_the_gpus() -> None:
    assert [(w.name, w.env) for w in plan_workers(gpus=None, device="cpu")] == [
        ("worker", {"CUDA_VISIBLE_DEVICES": ""})]
    assert [w.name for w in plan_workers(gpus=None, device="cpu", workers=3)] == [
        "worker-0", "worker-1", "worker-2"]
    with pytest.raises(ValueError, match="contradict"):
        plan_workers(gpus=["0"], device="cpu")


def test_default_is_every_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan_workers(gpus=None)] == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    # No GPU: one worker on the default device, as on any CPU-only machine.
    assert [(w.name, w.env) for w in plan_workers(gpus=None)] == [("worker", {})]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_explicit_device_ordinal_is_one_worker() -> None:
    assert [w.name for w in plan_workers(gpus=None, device="cuda:1")] == ["worker"]
    with pytest.raises(ValueError, match="names one GPU"):
        plan_workers(gpus=["0", "1"], device="cuda:1")


def test_parse_gpus_refuses_what_it_cannot_mean() -> None:
    assert parse_gpus("0, 1,GPU-8f2a") == ["0", "1", "GPU-8f2a"]
    for bad in ("", "0,,1", " , "):
        with pytest.raises(ValueError, match="comma-separated"):
            parse_gpus(bad)
    with pytest.raises(ValueError, match="listed twice"):
        parse_gpus("0,1,0")
