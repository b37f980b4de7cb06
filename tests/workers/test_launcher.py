"""The local worker launcher, without vLLM: command, environment, failures, reaping."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tandem.workers import launcher, vllm_args


def _worker(
    tmp_path: Path, python: str = sys.executable, role: vllm_args.Role = "decode"
) -> launcher.WorkerProcess:
    engine = vllm_args.EngineArgs(
        model="/m", served_name="s", host="127.0.0.1", port=launcher.free_port()
    )
    settings = launcher.WorkerSettings(
        name="w", role=role, engine=engine, run_dir=tmp_path / "w", cpus="1", python=python,
        startup_timeout_s=20,
    )  # fmt: skip
    return launcher.WorkerProcess(settings)


def test_command_is_the_shared_vllm_command(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    assert worker.command() == vllm_args.build_vllm_command(
        worker.settings.engine, "decode", sys.executable
    )


def test_environment_keeps_everything_in_the_run_dir(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    worker.nixl_side_channel_port = 5601
    env = worker.environment(base={"HOME": "/root"})
    for key in (
        "TMPDIR",
        "XDG_CACHE_HOME",
        "VLLM_CACHE_ROOT",
        "HF_HOME",
        "TORCHINDUCTOR_CACHE_DIR",
    ):
        assert env[key].startswith(str(worker.run_dir)), key
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_aggregated_worker_needs_no_side_channel(tmp_path: Path) -> None:
    env = _worker(tmp_path, role="aggregated").environment(base={})
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env


def test_a_worker_that_dies_raises_with_its_log_and_leaves_nothing(tmp_path: Path) -> None:
    # The interpreter runs `-m vllm...`; without vLLM importable it exits at once.
    fake = tmp_path / "fakepython"
    fake.write_text("#!/bin/sh\necho 'boom: no engine here' >&2\nexit 3\n")
    fake.chmod(0o755)
    worker = _worker(tmp_path, python=str(fake))
    worker.start()
    pid = worker.pid
    assert pid is not None
    with pytest.raises(launcher.WorkerStartError, match="boom: no engine here"):
        worker.wait_ready_sync()
    worker.stop_sync()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_interpreter_is_a_start_error(tmp_path: Path) -> None:
    worker = _worker(tmp_path, python=str(tmp_path / "nope"))
    with pytest.raises(launcher.WorkerStartError, match="cannot run"):
        worker.start()


def test_too_long_run_dir_is_refused_up_front(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    with pytest.raises(launcher.WorkerError, match="too long"):
        _worker(deep).start()
