"""torch's thread count chosen for the machine: physical cores among the CPUs this process may use, hyperthread
siblings once, at most the cgroup quota; compute.threads overrides it."""

from __future__ import annotations

import os

import pytest
import torch

from surgeon import utils


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_physical_cores_respect_affinity_and_count_siblings_once(monkeypatch, tmp_path):
    topo = {0: ("0", "0"), 1: ("0", "0"), 2: ("0", "1"), 3: ("0", "1"), 4: ("1", "0")}  # 2 SMT pairs + 1 core
    real_path = utils.Path

    def fake_path(p, *rest):
        p = str(p)
        if p.startswith("/sys/devices/system/cpu/cpu"):
            cpu = int(p.removeprefix("/sys/devices/system/cpu/cpu").split("/")[0])
            folder = tmp_path / f"cpu{cpu}" / "topology"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "physical_package_id").write_text(topo[cpu][0] + "\n")
            (folder / "core_id").write_text(topo[cpu][1] + "\n")
            return folder
        if p == "/sys/fs/cgroup/cpu.max":
            return tmp_path / "cpu.max"
        return real_path(p, *rest)

    monkeypatch.setattr(utils, "Path", fake_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert utils.physical_cores() == 3  # cpus 0/1 and 2/3 are siblings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 4})
    assert utils.physical_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a quota of 1.5 CPUs
    assert utils.physical_cores() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert utils.physical_cores() == 3


def test_torch_threads_default_and_override(restore_threads):
    n = utils.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert utils.torch_threads(None) == n and torch.get_num_threads() == n
    assert utils.torch_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="at least 1"):
        utils.torch_threads(-2)
