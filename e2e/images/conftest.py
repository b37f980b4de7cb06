"""Tandem's own container images, built without Docker and run without Docker.

The session fixture ``built_images`` runs ``scripts/build-images.sh all`` (a no-op
when the images are up to date; a cold build takes minutes) and fails the tests
when the build fails. ``TANDEM_SKIP_IMAGES=1`` skips them instead.

An image is run from its tar, not from the build cache: ``unpack`` applies the
OCI layers (whiteouts included) into a root filesystem under
``.tandem/images/rootfs/`` (kept per manifest digest), and ``ImageRunner`` starts
the image's command in it the way a locked-down pod would: the root filesystem
bind-mounted read-only, a private mount and PID namespace (``unshare``), the
config's user (10001), environment and entrypoint, ``/tmp`` a writable host
folder (the emptyDir), ``/dev`` minimal, ``/dev/shm`` a tmpfs, ``/sys`` read-only; the host network.
Needs root (mounts, chroot).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"
IMAGES_DIR = REPO_ROOT / ".tandem" / "images"
MARKER = (
    "images: builds Tandem's container images (scripts/build-images.sh) and runs them; needs root"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def _say(request: pytest.FixtureRequest, message: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"images: {message}")


@pytest.fixture(scope="session")
def built_images(request: pytest.FixtureRequest) -> dict[str, dict[str, object]]:
    """Build (or find up to date) both images; {image name: its .tandem/images/<name>.json}."""
    if os.environ.get("TANDEM_SKIP_IMAGES") == "1":
        pytest.skip("TANDEM_SKIP_IMAGES=1")
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    log_path = IMAGES_DIR / "build.log"
    _say(request, f"scripts/build-images.sh all (cold: minutes; log: {log_path})")
    started = time.monotonic()
    with log_path.open("wb") as log:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "all"], stdout=log, stderr=log, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(
            f"scripts/build-images.sh failed (exit {result.returncode}); "
            f"TANDEM_SKIP_IMAGES=1 skips these tests.\n{tail}",
            pytrace=False,
        )
    _say(request, f"images ready ({time.monotonic() - started:.0f} s)")
    return {
        name: json.loads((IMAGES_DIR / f"{name}.json").read_text())
        for name in ("tandem", "tandem-vllm-cpu")
    }


# --------------------------------------------------------------------------- unpacking


def _read_blob(outer: tarfile.TarFile, digest: str) -> bytes:
    f = outer.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
    assert f is not None
    return f.read()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def unpack(archive: Path, dest: Path) -> dict[str, object]:
    """Apply the image's layers into DEST; returns the image config."""
    with tarfile.open(archive) as outer:
        index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(_read_blob(outer, index["manifests"][0]["digest"]))
        config = json.loads(_read_blob(outer, manifest["config"]["digest"]))
        dest.mkdir(parents=True)
        for layer in manifest["layers"]:
            assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar", layer
            member = outer.getmember(f"blobs/sha256/{layer['digest'].split(':', 1)[1]}")
            stream = outer.extractfile(member)
            with tarfile.open(fileobj=stream, mode="r|") as inner:
                for m in inner:
                    parent, _, base = m.name.rstrip("/").rpartition("/")
                    if base == ".wh..wh..opq":
                        # children of this layer come after the marker: clear the lower ones
                        for child in (dest / parent).iterdir():
                            _remove(child)
                        continue
                    if base.startswith(".wh."):
                        _remove(dest / parent / base[4:])
                        continue
                    target = dest / m.name
                    if (target.exists() or target.is_symlink()) and not (
                        m.isdir() and target.is_dir()
                    ):
                        _remove(target)
                    inner.extract(m, dest, numeric_owner=True, filter="fully_trusted")
    return config


def unpacked(image: str, meta: dict[str, object]) -> tuple[Path, dict[str, object]]:
    """The image's root filesystem (unpacked once per manifest digest) and its config."""
    digest = str(meta["manifestDigest"]).split(":", 1)[1][:16]
    root = IMAGES_DIR / "rootfs"
    dest = root / f"{image}-{digest}"
    done = dest.with_suffix(".config.json")
    if not done.is_file():
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"{image}-*"):
            _remove(old)
        started = time.monotonic()
        config = unpack(Path(str(meta["tar"])), dest)
        config["_unpack_seconds"] = round(time.monotonic() - started, 1)
        done.write_text(json.dumps(config))
    return dest, json.loads(done.read_text())


# --------------------------------------------------------------------------- running

_RUN_SCRIPT = r"""
set -eu
M="$1"; T="$2"; U="$3"; shift 3
mount --bind "$M" "$M"
mount -o remount,bind,ro "$M"
mount -t proc proc "$M/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$M/sys"
mount -t tmpfs -o mode=755,nosuid tandem-dev "$M/dev"
for d in null zero full random urandom tty; do : > "$M/dev/$d"; mount --bind "/dev/$d" "$M/dev/$d"; done
mkdir "$M/dev/shm"; mount -t tmpfs -o mode=1777,nosuid,nodev,size=1g shm "$M/dev/shm"
ln -s /proc/self/fd "$M/dev/fd"
mount --bind "$T" "$M/tmp"
exec chroot --userspec="$U" "$M" /usr/bin/env -i "$@"
"""


@dataclass
class ImageRunner:
    rootfs: Path
    config: dict[str, object]
    tmp: Path  # mounted at /tmp, writable (the pod's emptyDir)

    @property
    def _cfg(self) -> dict[str, object]:
        return self.config["config"]  # type: ignore[return-value]

    def argv(
        self, command: Sequence[str] | None = None, args: Sequence[str] | None = None
    ) -> list[str]:
        """Like Kubernetes: COMMAND replaces the entrypoint, ARGS the cmd."""
        entry = list(command) if command is not None else list(self._cfg.get("Entrypoint") or [])  # type: ignore[arg-type]
        rest = (
            list(args)
            if args is not None
            else ([] if command is not None else list(self._cfg.get("Cmd") or []))
        )  # type: ignore[arg-type]
        user = str(self._cfg.get("User") or "0")
        u, _, g = user.partition(":")
        env = [str(e) for e in self._cfg.get("Env") or []]  # type: ignore[union-attr]
        env += [f"{k}={v}" for k, v in self.extra_env.items()]
        return [
            "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
            "/bin/sh", "-c", _RUN_SCRIPT, "run", str(self.rootfs), str(self.tmp), f"{u}:{g or u}",
            *env, *entry, *rest,
        ]  # fmt: skip

    extra_env: dict[str, str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.extra_env = {}
        self.tmp.chmod(0o1777)

    def run(self, command: Sequence[str] | None = None, args: Sequence[str] | None = None,
            timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        self.extra_env = dict(env or {})
        return subprocess.run(
            self.argv(command, args), capture_output=True, text=True, timeout=timeout
        )

    def start(self, command: Sequence[str] | None = None, args: Sequence[str] | None = None,
              env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        self.extra_env = dict(env or {})
        with open(log or self.tmp / "container.log", "wb") as out:
            return subprocess.Popen(self.argv(command, args), stdout=out, stderr=subprocess.STDOUT)


def _runner(image: str, built: dict[str, dict[str, object]], tmp: Path) -> ImageRunner:
    if os.geteuid() != 0:
        pytest.fail("running an image needs root (mounts, chroot)", pytrace=False)
    rootfs, config = unpacked(image, built[image])
    return ImageRunner(rootfs, config, tmp)


@pytest.fixture
def tandem_image(built_images: dict[str, dict[str, object]], tmp_path: Path) -> ImageRunner:
    return _runner("tandem", built_images, tmp_path)


@pytest.fixture
def vllm_image(built_images: dict[str, dict[str, object]], tmp_path: Path) -> ImageRunner:
    return _runner("tandem-vllm-cpu", built_images, tmp_path)


@pytest.fixture
def stop() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; terminated (with their PID namespace) at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
