"""Run a vLLM OpenAI server for one worker role as a local child process.

The command line comes from :func:`tandem.workers.vllm_args.build_vllm_command`
(the operator's pods use the same function); this module only does the I/O
around it: a private run directory, the environment, readiness, and a clean stop.

Every worker gets a run directory holding its log and every cache and temporary
directory vLLM, torch, Hugging Face and friends would otherwise put in ``~`` or
``/tmp``; it runs with that directory as its working directory, in its own
process group (vLLM forks an engine core and a worker process; the caller's
session, see :meth:`WorkerProcess.start`), so stopping it
reaps all of them, and removes the shared memory (``/dev/shm``) the group held
that nobody holds any more: a worker stopped mid-boot, or killed, never runs the
cleanup that would have removed it.

Usage, blocking (tests)::

    worker = WorkerProcess(WorkerSettings(name="decode", role="decode", engine=args,
                                          run_dir=tmp / "decode", cpus="1"))
    with worker:              # start + wait for /health, then stop + reap
        httpx.post(worker.url + "/v1/completions", ...)

or asynchronously (local mode)::

    await start_all([prefill, decode])
    ...
    await stop_all([prefill, decode])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from tandem.workers import phases, vllm_args

logger = logging.getLogger(__name__)

_UNIX_SOCKET_PATH_MAX = 107
"""sun_path limit; vLLM puts ``ipc://$TMPDIR/<uuid4>`` sockets in the temp dir."""
_IPC_NAME_LEN = 1 + 36

SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "sem.mp-", "ucx", "nixl")
"""The shared-memory files of a worker's stack: Python's ``multiprocessing``
(``psm_*`` segments, ``sem.mp-*`` semaphores), UCX and NIXL. Only such names are
ever removed by a stop, and only when no living process holds them."""


class WorkerError(Exception):
    """A worker could not be started or stopped."""


class WorkerStartError(WorkerError):
    """The worker died or did not become healthy in time; the message ends with its log."""


@dataclass(frozen=True)
class WorkerSettings:
    """How to run one vLLM worker locally."""

    name: str
    """Short and unique among the workers of a run: names the log and log lines."""
    role: vllm_args.Role
    engine: vllm_args.EngineArgs
    run_dir: Path
    """The worker's own directory: log, caches, temp files. Created if missing."""
    cpus: str | None = None
    """``VLLM_CPU_OMP_THREADS_BIND``: the cores of the worker's compute threads
    (``"0"``, ``"2-3"``). Give prefill and decode different cores, or they fight
    over them. ``None`` leaves it to vLLM."""
    nixl_side_channel_port: int | None = None
    """The port NIXL handshakes on (``VLLM_NIXL_SIDE_CHANNEL_PORT``); must differ
    between workers on one host. ``None`` picks a free one at start. Unused by
    ``aggregated`` workers."""
    local_ip: str = "127.0.0.1"
    """The address vLLM advertises (``VLLM_HOST_IP``) and NIXL's side channel binds
    and announces to peers in ``kv_transfer_params`` (``remote_host``)."""
    kv_cache_space_gib: int = 1
    """``VLLM_CPU_KVCACHE_SPACE``: memory for the KV cache of a CPU worker."""
    python: str = sys.executable
    """The interpreter with vLLM installed."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Applied last, over everything this module sets."""
    command: Sequence[str] | None = None
    """Run this instead of vLLM's server (the engine emulator, in local mode): the
    same process handling (session, log, health, stop and reaping) for any worker."""
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    """Grace after SIGTERM before the process group is killed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick)."""
    [port] = free_ports(1, host)
    return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago (all bound at once,
    so the kernel cannot pick one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class WorkerProcess:
    """One vLLM server child process and its run directory."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir.absolute()
        self.log_path = self.run_dir / "worker.log"
        self.nixl_side_channel_port = settings.nixl_side_channel_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_at = 0.0
        self._stopped = False
        self._phase = phases.Phase.IMPORTING
        self._log_read = 0
        """Bytes of the log already read for :meth:`refresh_phase`."""

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.settings.name} {self.settings.role} pid={self.pid}>"

    # -- what it runs ----------------------------------------------------------

    @property
    def url(self) -> str:
        """Where its OpenAI API answers (wildcard binds are reached on loopback)."""
        host = self.settings.engine.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.settings.engine.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def command(self) -> list[str]:
        if self.settings.command is not None:
            return list(self.settings.command)
        return vllm_args.build_vllm_command(
            self.settings.engine, self.settings.role, self.settings.python
        )

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: ``base`` (default ``os.environ``) plus ours."""
        s = self.settings
        cache, config, tmp = self.run_dir / "cache", self.run_dir / "config", self.run_dir / "tmp"
        env = dict(os.environ if base is None else base)
        env.update(
            {
                # Never reach a model hub; the model is a local directory.
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "DO_NOT_TRACK": "1",
                # Everything that would land in ~ or /tmp goes to the run dir.
                "TMPDIR": str(tmp),
                "XDG_CACHE_HOME": str(cache),
                "XDG_CONFIG_HOME": str(config),
                "XDG_DATA_HOME": str(self.run_dir / "data"),
                "VLLM_CACHE_ROOT": str(cache / "vllm"),
                "VLLM_CONFIG_ROOT": str(config / "vllm"),
                "VLLM_RPC_BASE_PATH": str(tmp),
                "HF_HOME": str(cache / "huggingface"),
                "TORCH_HOME": str(cache / "torch"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
                "TRITON_CACHE_DIR": str(cache / "triton"),
                "NUMBA_CACHE_DIR": str(cache / "numba"),
                "OUTLINES_CACHE_DIR": str(cache / "outlines"),
                "MPLCONFIGDIR": str(config / "matplotlib"),
                # The engine's memory and addresses.
                "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_space_gib),
                "VLLM_HOST_IP": s.local_ip,
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        if s.cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = s.cpus
        if s.role != "aggregated":
            if self.nixl_side_channel_port is None:
                raise WorkerError(f"{s.name}: no NIXL side-channel port yet (call start())")
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.nixl_side_channel_port)
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = s.local_ip
        env.update(s.env)
        return env

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server and return at once; :meth:`wait_ready` waits for it."""
        if self._proc is not None:
            raise WorkerError(f"{self.settings.name}: already started (pid {self._proc.pid})")
        s = self.settings
        tmp = self.run_dir / "tmp"
        if s.command is None and len(str(tmp)) + _IPC_NAME_LEN > _UNIX_SOCKET_PATH_MAX:
            raise WorkerError(
                f"{s.name}: run dir {self.run_dir} is too long for vLLM's unix sockets "
                f"under {tmp} (at most {_UNIX_SOCKET_PATH_MAX - _IPC_NAME_LEN} characters)"
            )
        if s.role != "aggregated" and self.nixl_side_channel_port is None:
            self.nixl_side_channel_port = free_port(s.local_ip)
        for sub in ("tmp", "cache", "config", "data"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        command, env = self.command(), self.environment()
        self._log = self.log_path.open("ab")
        self._log.write(f"# tandem launcher: {shlex.join(command)}\n".encode())
        self._log.flush()
        # cwd is the run dir: `python -m` puts the working directory first on
        # sys.path, and the repository root holds an `operator/` folder that
        # would shadow the stdlib module of that name.
        try:
            self._proc = subprocess.Popen(
                command,
                cwd=self.run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                # Its own process group (stopping it reaps every process it forked) but
                # the caller's session: the kernel's autogroup scheduler shares the CPU
                # between sessions, not threads, and a worker in a session of its own
                # starved its peer for 10-30 s while the prefill engine spun waiting
                # for the decode's KV read (0 of 50 rounds stalled in one session,
                # 8 of 62 in separate ones, measured on 2 cores over TCP).
                process_group=0,
            )
        except OSError as exc:
            self._close_log()
            raise WorkerStartError(f"{s.name}: cannot run {command[0]}: {exc}") from exc
        self._started_at = time.monotonic()
        logger.info(
            "[%s] started %s worker, pid %d, %s, log %s",
            s.name, s.role, self._proc.pid, self.url, self.log_path,
        )  # fmt: skip

    def _check_alive(self) -> None:
        proc = self._require_started()
        code = proc.poll()
        if code is not None:
            self.stop_sync()
            raise WorkerStartError(
                f"{self.settings.name}: the worker exited with code {code} before it was ready; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def phase(self) -> phases.Phase:
        """The start phase reached, as of the last :meth:`refresh_phase`."""
        return self._phase

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def refresh_phase(self) -> phases.Phase:
        """Read what the worker logged since the last call and advance its phase."""
        if self._phase is phases.Phase.READY:
            return self._phase
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_read)
                chunk = f.read()
        except FileNotFoundError:
            return self._phase
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written line waits for the next call
        self._log_read += len(complete)
        lines = complete.decode(errors="replace").splitlines()
        self._phase = phases.phase_of(lines, self._phase)
        return self._phase

    def _log_ready(self) -> None:
        self._phase = phases.Phase.READY
        elapsed = time.monotonic() - self._started_at
        logger.info("[%s] ready after %.0f s", self.settings.name, elapsed)

    def _timed_out(self, timeout: float) -> WorkerStartError:
        return WorkerStartError(
            f"{self.settings.name}: not healthy at {self.url}/health after {timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    async def wait_ready(self, startup_timeout_s: float | None = None) -> None:
        """Wait until ``/health`` answers 200. On death or timeout the worker is
        stopped and :class:`WorkerStartError` carries the tail of its log."""
        timeout = startup_timeout_s or self.settings.startup_timeout_s
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        self._log_ready()
                        return
                if time.monotonic() > deadline:
                    error = self._timed_out(timeout)
                    await self.stop()
                    raise error
                await asyncio.sleep(0.5)

    def wait_ready_sync(self, startup_timeout_s: float | None = None) -> None:
        """Blocking :meth:`wait_ready`."""
        timeout = startup_timeout_s or self.settings.startup_timeout_s
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        self._log_ready()
                        return
                if time.monotonic() > deadline:
                    error = self._timed_out(timeout)
                    self.stop_sync()
                    raise error
                time.sleep(0.5)

    async def stop(self) -> int | None:
        """Stop the server and every process of its group; returns its exit code."""
        return await asyncio.to_thread(self.stop_sync)

    def stop_sync(self) -> int | None:
        """Blocking :meth:`stop`: SIGTERM to the server (it shuts its engine down),
        then the whole group after ``stop_timeout_s``, then SIGKILL; then the
        shared memory the group left behind (see :meth:`_finish`). A no-op once
        stopped (or killed): returns the same exit code again."""
        return self._end(self._terminate)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            logger.info("[%s] stopping pid %d", self.settings.name, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.settings.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "[%s] no exit %.0f s after SIGTERM; killing its process group",
                    self.settings.name, self.settings.stop_timeout_s,
                )  # fmt: skip
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill_sync(self) -> int | None:
        """A crash: SIGKILL to the worker's whole process group (no shutdown of any
        of its processes), then the same reaping and cleanup as :meth:`stop_sync`.
        A no-op once stopped (or killed)."""
        return self._end(self._kill)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        logger.info("[%s] killing process group %d", self.settings.name, proc.pid)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def _end(self, how: Callable[[subprocess.Popen[bytes]], None]) -> int | None:
        """Stop the server with ``how``, then :meth:`_finish`; the shared memory its
        group holds is noted first, before any signal."""
        proc = self._proc
        if proc is None:
            return None
        if self._stopped:
            return proc.returncode
        held = shm_held_by_group(proc.pid)
        how(proc)
        return self._finish(proc, held)

    def _finish(self, proc: subprocess.Popen[bytes], held: Mapping[str, int]) -> int | None:
        """After the server exited: reap its group, close the log, and remove
        ``held`` (its group's shared memory, taken before any signal) where no
        living process holds it any more. A clean shutdown leaves nothing there;
        one cut short (SIGTERM mid-boot, SIGKILL) skips the cleanup of
        ``multiprocessing``'s resource tracker, UCX and NIXL."""
        self._reap_group()
        self._close_log()
        removed = remove_orphaned_shm(held)
        if removed:
            logger.info("[%s] removed from %s: %s", self.settings.name, SHM_DIR, removed)
        # Only unix sockets and rendezvous files live there; the log and caches stay.
        shutil.rmtree(self.run_dir / "tmp", ignore_errors=True)
        self._stopped = True
        return proc.returncode

    def _reap_group(self) -> None:
        """Make sure nothing of the worker's process group outlives it: its
        children are normally gone with it; stragglers get SIGTERM, then SIGKILL."""
        proc = self._require_started()
        proc.wait()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                if not _signal_group(proc.pid, sig):
                    return
                logger.warning("[%s] sent %s to leftover processes", self.settings.name, sig.name)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if not _group_alive(proc.pid):
                    return
                time.sleep(0.1)
        logger.warning("[%s] process group %d still not empty", self.settings.name, proc.pid)

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise WorkerError(f"{self.settings.name}: not started")
        return self._proc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- context managers ------------------------------------------------------

    def __enter__(self) -> WorkerProcess:
        self.start()
        self.wait_ready_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    async def __aenter__(self) -> WorkerProcess:
        self.start()
        await self.wait_ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_all(
    workers: Sequence[WorkerProcess], startup_timeout_s: float | None = None
) -> None:
    """Start several workers side by side (their boots overlap) and wait for all;
    if one fails, all are stopped and the first error is raised."""
    try:
        for worker in workers:
            worker.start()
        await asyncio.gather(*(worker.wait_ready(startup_timeout_s) for worker in workers))
    except BaseException:
        await stop_all(workers)
        raise


def start_all_sync(
    workers: Sequence[WorkerProcess], startup_timeout_s: float | None = None
) -> None:
    """Blocking :func:`start_all`."""
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready_sync(startup_timeout_s)
    except BaseException:
        stop_all_sync(workers)
        raise


async def stop_all(workers: Iterable[WorkerProcess]) -> None:
    await asyncio.gather(*(worker.stop() for worker in workers))


def stop_all_sync(workers: Iterable[WorkerProcess]) -> None:
    for worker in workers:
        try:
            worker.stop_sync()
        except Exception:
            logger.exception("[%s] stop failed", worker.settings.name)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


# -- shared memory ---------------------------------------------------------------


def _all_pids() -> list[int]:
    """Every process's id (none without a Linux ``/proc``: nothing is removed)."""
    try:
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []


def _group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (empty once it is gone)."""
    pids = []
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # pid (comm) state ppid pgrp
            pids.append(pid)
    return pids


def _shm_in_use(pids: Iterable[int]) -> set[int]:
    """The inodes of the /dev/shm files these processes map or hold open
    (processes that are gone or not ours to read are skipped).

    Inodes, not names: ``sem_open`` creates a semaphore under a temporary name,
    maps it, links it to its real name (``sem.mp-*``) and unlinks the temporary
    one, so the mapping shows ``/dev/shm/sem.XXXXXX (deleted)``.
    """
    prefix = f"{SHM_DIR}/"
    inodes: set[int] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode path
            if len(fields) == 6 and fields[5].startswith(prefix):
                inodes.add(int(fields[4]))
        for fd in fds:
            try:
                if os.readlink(fd).startswith(prefix):
                    inodes.add(fd.stat().st_ino)
            except OSError:
                continue
    return inodes


def _shm_files() -> dict[str, int]:
    """The worker-stack files in /dev/shm (:data:`SHM_PREFIXES`), by inode."""
    files: dict[str, int] = {}
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return files
    for entry in entries:
        if entry.name.startswith(SHM_PREFIXES):
            with contextlib.suppress(OSError):
                files[entry.name] = entry.stat(follow_symlinks=False).st_ino
    return files


def shm_held_by_group(pgid: int) -> dict[str, int]:
    """The worker-stack files in /dev/shm (:data:`SHM_PREFIXES`) that process
    group ``pgid`` maps or holds open now: name to inode."""
    pids = _group_pids(pgid)
    if not pids:
        return {}
    held = _shm_in_use(pids)
    return {name: inode for name, inode in _shm_files().items() if inode in held}


def remove_orphaned_shm(held: Mapping[str, int]) -> list[str]:
    """Remove the files of ``held`` (from :func:`shm_held_by_group`) that are
    still the same files and that no living process maps or holds open any more;
    returns the removed names, sorted."""
    if not held:
        return []
    in_use = _shm_in_use(_all_pids())
    removed = []
    for name, inode in sorted(_shm_files().items()):
        if held.get(name) != inode or inode in in_use:
            continue
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot remove %s: %s", SHM_DIR / name, exc)
            continue
        removed.append(name)
    return removed
