"""Drop the CUDA libraries a CPU-only engine venv never loads.

    python prune_cuda.py VENV

PyPI's torch is the CUDA build: libtorch_cuda.so links (DT_NEEDED) cudart, cuBLAS,
cuDNN, NCCL... so ``import torch`` needs those files even on a CPU. What no ELF
file outside ``nvidia/`` needs, directly or through another needed library, is
only ever dlopen()ed on a GPU (cuDNN's engine libraries, cuSOLVERMg, nvrtc.alt,
CUPTI's perf libraries) and goes, with the headers and static archives. Then
``import torch, vllm, nixl`` is checked; a failure fails the build.
Standard library only (no readelf in the image).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path


def needed(path: Path) -> list[str]:
    """DT_NEEDED of an ELF64 little-endian file ([] for anything else)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)
    ]
    out = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for k in range(sh[5] // 16):
            tag, val = struct.unpack_from("<qQ", data, sh[4] + k * 16)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + val)
                out.append(data[str_off + val : end].decode())
    return out


def main(venv: Path) -> int:
    site = next((venv / "lib").glob("python3*/site-packages"))
    nvidia = site / "nvidia"
    if not nvidia.is_dir():
        print("prune_cuda: no nvidia/ folder, nothing to do")
        return 0
    by_name: dict[str, list[Path]] = {}
    for p in nvidia.rglob("*"):
        if p.is_file() and ".so" in p.name:
            by_name.setdefault(p.name, []).append(p)
    roots = [
        p for p in site.rglob("*") if p.is_file() and ".so" in p.name and nvidia not in p.parents
    ]
    keep: set[Path] = set()
    todo = [n for p in roots for n in needed(p)]
    while todo:
        name = todo.pop()
        for p in by_name.get(name, []):
            if p not in keep:
                keep.add(p)
                todo.extend(needed(p))
    before = sum(p.stat().st_size for p in nvidia.rglob("*") if p.is_file())
    for p in sorted(nvidia.rglob("*"), reverse=True):
        if p.is_file() or p.is_symlink():
            if p.resolve() not in keep and p not in keep and p.name != "__init__.py":
                p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    after = sum(p.stat().st_size for p in nvidia.rglob("*") if p.is_file())
    print(
        f"prune_cuda: nvidia/ {before / 1e9:.2f} GB -> {after / 1e9:.2f} GB "
        f"({len(keep)} libraries kept)"
    )
    check = "import torch, vllm, nixl; print('prune_cuda: import torch', torch.__version__, 'vllm', vllm.__version__, 'nixl ok')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(venv / "bin" / "python"), "-c", check], cwd="/", env=env).returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
