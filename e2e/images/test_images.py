"""The tandem and tandem-vllm-cpu images: built here, run as a pod would run them."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.images

VERSION = "0.1.0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"exited {proc.returncode} before {url} answered:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --------------------------------------------------------------------------- both


@pytest.mark.parametrize("image", ["tandem", "tandem-vllm-cpu"])
def test_archive_names_the_image(built_images: dict[str, dict[str, object]], image: str) -> None:
    meta = built_images[image]
    assert meta["ref"] == f"ghcr.io/tandem-dev/{image}:{VERSION}"
    expected = Path(__file__).resolve().parents[2] / ".tandem" / "images" / f"{image}.tar"
    assert Path(str(meta["tar"])).resolve() == expected.resolve()
    import tarfile

    with tarfile.open(str(meta["tar"])) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert "oci-layout" in tar.getnames()
    annotations = index["manifests"][0]["annotations"]
    assert annotations["org.opencontainers.image.ref.name"] == meta["ref"]
    assert annotations["io.containerd.image.name"] == meta["ref"]


# --------------------------------------------------------------------------- tandem


def test_tandem_version(tandem_image) -> None:  # type: ignore[no-untyped-def]
    out = _ok(tandem_image.run(args=["--version"]))
    assert out.strip() == f"tandem {VERSION}"
    assert tandem_image.config["config"]["Entrypoint"] == ["tandem"]


def test_tandem_runs_locked_down(tandem_image) -> None:  # type: ignore[no-untyped-def]
    """Non-root, read-only root filesystem, HOME on /tmp, every module byte-compiled."""
    script = (
        "import os, importlib.util, tandem.cli, tandem.router.app, kopf\n"
        "print(os.getuid(), os.getgid(), os.environ['HOME'])\n"
        "for m in (tandem.cli, tandem.router.app, kopf):\n"
        "    assert os.path.exists(importlib.util.cache_from_source(m.__file__)), m.__file__\n"
        "try:\n    open('/opt/probe', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n"
    )
    out = _ok(tandem_image.run(["python3", "-c", script]))
    assert out.split() == ["10001", "10001", "/tmp", "ro", "30"]  # EROFS
    assert not list(tandem_image.tmp.iterdir()), "wrote into /tmp"


def test_tandem_has_no_torch(tandem_image) -> None:  # type: ignore[no-untyped-def]
    out = _ok(
        tandem_image.run(
            ["python3", "-c", "import importlib.util as u; print(u.find_spec('torch'))"]
        )
    )
    assert out.strip() == "None"


def test_router_answers_health(tandem_image, stop) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    config = {
        "servedModelName": "tiny",
        "discovery": {"kind": "static", "decode": ["http://127.0.0.1:9"]},
    }
    (tandem_image.tmp / "router.json").write_text(json.dumps(config))
    log = tandem_image.tmp.parent / "router.log"
    proc = tandem_image.start(
        args=["router", "--config", "/tmp/router.json", "--host", "127.0.0.1", "--port", str(port)],
        log=log,
    )
    stop.append(proc)
    _wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=60)


# --------------------------------------------------------------------------- tandem-vllm-cpu


def test_vllm_image_imports_engine(vllm_image) -> None:  # type: ignore[no-untyped-def]
    script = (
        "import sys, time; t = time.monotonic()\n"
        "import vllm, torch, nixl\n"
        "print(sys.prefix, vllm.__version__, torch.__version__, f'{time.monotonic() - t:.1f}')\n"
    )
    out = _ok(vllm_image.run(["python3", "-c", script], env={"HF_HUB_OFFLINE": "1"}, timeout=300))
    prefix, vllm_version, torch_version, seconds = out.split()[-4:]
    assert (
        prefix == "/opt/venv"
    )  # `python3` is the engine venv's: the operator runs `python3 -m vllm...`
    assert vllm_version == "0.32.0"
    assert torch_version.startswith("2.13.0")
    print(f"import vllm, torch, nixl inside the image: {seconds} s")
    assert vllm_image.config["config"]["User"] == "10001:10001"


def test_vllm_image_builds_tiny_model_and_has_cli(vllm_image) -> None:  # type: ignore[no-untyped-def]
    script = (
        "from pathlib import Path\n"
        "from tandem.workers.tinymodel import build_tiny_model\n"
        "print(build_tiny_model(Path('/tmp/model')))\n"
    )
    _ok(vllm_image.run(["python3", "-c", script], timeout=120))
    files = {p.name for p in (vllm_image.tmp / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
    assert _ok(vllm_image.run(["tandem", "--version"])).strip() == f"tandem {VERSION}"
    assert not list((vllm_image.tmp).glob("**/__pycache__"))


def test_vllm_image_serves_tiny_model(vllm_image, stop) -> None:  # type: ignore[no-untyped-def]
    """The image's entrypoint (what the operator's Deployment runs) answers a completion."""
    script = (
        "from pathlib import Path\n"
        "from tandem.workers.tinymodel import build_tiny_model\n"
        "build_tiny_model(Path('/tmp/model'))\n"
    )
    _ok(vllm_image.run(["python3", "-c", script], timeout=120))
    port = _free_port()
    log = vllm_image.tmp.parent / "vllm.log"
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": "/tmp/cache/vllm",
        "XDG_CACHE_HOME": "/tmp/cache",
    }
    proc = vllm_image.start(
        args=["--model", "/tmp/model", "--served-model-name", "tiny", "--host", "127.0.0.1",
              "--port", str(port), "--enforce-eager", "--max-model-len", "256"],
        env=env, log=log,
    )  # fmt: skip
    stop.append(proc)
    _wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=300)
    body = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 4}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] == 4
