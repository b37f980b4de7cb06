"""The local worker launcher, without vLLM: command, environment, failures, reaping."""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import sys
import time
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


# -- shared memory left by a worker cut short ------------------------------------

_HOLDER = """\
import mmap, multiprocessing, os, sys, time

path = sys.argv[1]
if os.fork() == 0:
    # Like vLLM's engine core: a child of the server, in its process group, maps a
    # segment and never cleans it up; it ends (without cleanup) with its parent.
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    segment = mmap.mmap(fd, 4096)
    os.close(fd)
    # And a named semaphore, as tqdm's lock in vLLM's worker: sem_open maps it under
    # a temporary name, and only the resource tracker (in the group too) unlinks it.
    lock = multiprocessing.get_context("spawn").Lock()
    print("sem", lock._semlock.name, flush=True)
    print("mapped", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(0)
time.sleep(3600)
"""


def _shm_holder(tmp_path: Path) -> tuple[launcher.WorkerProcess, Path]:
    """A worker whose "python" runs :data:`_HOLDER` on a fresh /dev/shm file, and
    that file."""
    shm = launcher.SHM_DIR / f"psm_tandemtest_{secrets.token_hex(6)}"
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {script} {shm}\n")
    fake.chmod(0o755)
    return _worker(tmp_path, python=str(fake)), shm


def _wait_mapped(worker: launcher.WorkerProcess, shm: Path) -> Path:
    """Waits until the holder mapped ``shm`` and made its semaphore; returns the
    semaphore's file."""
    deadline = time.monotonic() + 20.0
    while not (shm.exists() and "mapped" in worker.log_tail()):
        assert time.monotonic() < deadline, f"{shm} never mapped; log:\n{worker.log_tail()}"
        assert worker.returncode is None, worker.log_tail()
        time.sleep(0.05)
    return _semaphore(worker)


def _semaphore(worker: launcher.WorkerProcess) -> Path:
    names = [line.split()[1] for line in worker.log_tail().splitlines() if line.startswith("sem ")]
    assert names, worker.log_tail()
    return launcher.SHM_DIR / f"sem.{names[0].lstrip('/')}"


def _cleanup(worker: launcher.WorkerProcess, shm: Path) -> None:
    worker.kill_sync()
    shm.unlink(missing_ok=True)
    if worker.log_path.exists() and "sem " in worker.log_tail():
        _semaphore(worker).unlink(missing_ok=True)


@pytest.mark.skipif(not launcher.SHM_DIR.is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_a_worker_removes_the_shared_memory_it_left(tmp_path: Path, how: str) -> None:
    worker, shm = _shm_holder(tmp_path)
    try:
        worker.start()
        semaphore = _wait_mapped(worker, shm)
        assert semaphore.exists()
        pid = worker.pid
        assert pid is not None
        code = worker.stop_sync() if how == "stop" else worker.kill_sync()
        assert code == (-signal.SIGTERM if how == "stop" else -signal.SIGKILL)
        assert not shm.exists()
        assert not semaphore.exists()
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        # Stopped (or killed) once: stopping again is a no-op.
        assert worker.stop_sync() == code
        assert worker.kill_sync() == code
    finally:
        _cleanup(worker, shm)


@pytest.mark.skipif(not launcher.SHM_DIR.is_dir(), reason="no /dev/shm")
def test_shared_memory_still_held_elsewhere_is_kept(tmp_path: Path) -> None:
    worker, shm = _shm_holder(tmp_path)
    try:
        worker.start()
        _wait_mapped(worker, shm)
        with shm.open("rb"):  # this process holds it open too
            worker.kill_sync()
            assert shm.exists()
    finally:
        _cleanup(worker, shm)


def test_a_worker_gets_its_own_process_group_in_the_callers_session(tmp_path: Path) -> None:
    """Separate sessions (autogroups) let one worker starve the other of CPU."""
    settings = launcher.WorkerSettings(
        name="w", role="decode", engine=vllm_args.EngineArgs(model="m", served_name="m", port=1),
        run_dir=tmp_path / "w", command=[sys.executable, "-c", "import time; time.sleep(30)"],
    )  # fmt: skip
    worker = launcher.WorkerProcess(settings)
    worker.start()
    try:
        assert worker.pid is not None
        assert os.getpgid(worker.pid) == worker.pid
        assert os.getsid(worker.pid) == os.getsid(0)
    finally:
        worker.stop_sync()
