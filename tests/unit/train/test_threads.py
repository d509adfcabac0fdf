"""The CPU thread rule (train/engine/topology.py), checked with fake environments and launchers: no launch."""

from __future__ import annotations

import os
from types import SimpleNamespace

from slimforge.train.engine.topology import (
    cpu_threads_rule,
    launcher_process,
    local_processes,
    omp_set_by_user,
    plan_cpu_threads,
    usable_cores,
)
from slimforge.train.schema import RunConfig
from slimforge.train.state import changed_fields, fingerprint

# What `accelerate launch` puts in its child's environment when the user set nothing (OMP_NUM_THREADS=1 is its
# default), and the launcher process as /proc shows it: started without OMP_NUM_THREADS.
ACCELERATE_CHILD = {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}
ACCELERATE = ({"PATH": "/usr/bin"}, [".venv/bin/accelerate", "launch", "--config_file", "single.yaml", "train.py"])


def test_accelerate_default_is_replaced_by_cores_over_local_processes():
    threads, why = plan_cpu_threads(None, ACCELERATE_CHILD, ACCELERATE, cores=8)
    assert threads == 8
    assert "launcher's default" in why and "8 usable cores ÷ 1 local process;" in why
    # Two processes on this machine (torchrun's LOCAL_WORLD_SIZE) share the cores.
    threads, why = plan_cpu_threads(None, ACCELERATE_CHILD | {"LOCAL_WORLD_SIZE": "2"}, ACCELERATE, cores=8)
    assert threads == 4 and "÷ 2 local processes" in why


def test_never_fewer_than_one_thread():
    env = ACCELERATE_CHILD | {"LOCAL_WORLD_SIZE": "4"}
    assert plan_cpu_threads(None, env, ACCELERATE, cores=2)[0] == 1


def test_an_exported_omp_num_threads_is_kept():
    launcher = ({"OMP_NUM_THREADS": "1"}, ACCELERATE[1])  # the user ran OMP_NUM_THREADS=1 accelerate launch ...
    threads, why = plan_cpu_threads(None, ACCELERATE_CHILD, launcher, cores=8)
    assert threads is None and "set by the user" in why


def test_the_launch_flag_counts_as_the_users():
    launcher = ({}, ["accelerate", "launch", "--num_cpu_threads_per_process", "3", "train.py"])
    assert omp_set_by_user(ACCELERATE_CHILD | {"OMP_NUM_THREADS": "3"}, launcher) is True
    assert omp_set_by_user(ACCELERATE_CHILD, ({}, ["accelerate", "launch", "--num_cpu_threads_per_process=3"]))


def test_without_a_launcher_the_variable_is_the_users():
    assert omp_set_by_user({"OMP_NUM_THREADS": "2"}, launcher=None) is True
    assert omp_set_by_user({}, launcher=None) is False
    threads, why = plan_cpu_threads(None, {}, None, cores=6)
    assert threads == 6 and "OMP_NUM_THREADS unset" in why


def test_an_unreadable_launcher_keeps_the_value_and_says_so():
    threads, why = plan_cpu_threads(None, ACCELERATE_CHILD, None, cores=8)
    assert threads is None and "train.cpu_threads" in why


def test_the_config_field_wins():
    launcher = ({"OMP_NUM_THREADS": "1"}, [])
    assert plan_cpu_threads(3, ACCELERATE_CHILD, launcher, cores=8) == (3, "train.cpu_threads=3")


def test_local_processes_falls_back_to_the_world():
    assert local_processes({"OMPI_COMM_WORLD_LOCAL_SIZE": "3", "WORLD_SIZE": "6"}) == 3
    assert local_processes({"WORLD_SIZE": "2"}) == 2
    assert local_processes({}) == 1


def test_gpu_runs_are_left_alone():
    assert cpu_threads_rule(4, on_cpu=False)[0] is None


def test_this_process_is_read():
    assert usable_cores() >= 1
    if os.path.exists(f"/proc/{os.getppid()}/environ"):
        env, argv = launcher_process()
        assert isinstance(env, dict) and argv


def test_changing_the_thread_count_does_not_refuse_resume():
    accelerator = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    prints = []
    for value in (None, 2):
        cfg = RunConfig()
        cfg.train.cpu_threads = value
        assert not cfg.train.validate()
        prints.append(fingerprint(cfg, accelerator))
    assert not changed_fields(*prints)


def test_zero_threads_is_a_config_error():
    cfg = RunConfig()
    cfg.train.cpu_threads = 0
    assert cfg.train.validate() == ["cpu_threads: 0 must be >= 1"]
