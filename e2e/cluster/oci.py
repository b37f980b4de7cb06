"""Pack static binaries as a one-layer OCI image archive, without Docker.

``scripts/cluster.sh`` uses it for the node's sandbox image (``pause``) and a
tiny HTTP server for tests (``echo``): no image can be pulled on these machines.

    python3 e2e/cluster/oci.py pack OUT.tar REF BINARY [BINARY ...]
    python3 e2e/cluster/oci.py refs ARCHIVE.tar      # "NAME DIGEST" per image

``pack`` writes an OCI image layout as an uncompressed tar: ``oci-layout``,
``index.json`` (one manifest, annotated with ``org.opencontainers.image.ref.name``
and ``io.containerd.image.name`` = REF, the full reference such as
``tandem.local/pause:latest``) and ``blobs/sha256/*``. Each BINARY lands at
``/<basename>`` with mode 0755; the first one is the entrypoint. The archive is
byte-for-byte reproducible (fixed mtimes, owners and order), so the same
binaries give the same manifest digest, and ``cluster.sh`` can skip an import
whose digest containerd already has. Only the standard library is used: this
runs with the machine's python3, outside the project's venv.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import sys
import tarfile
from pathlib import Path

_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def _info(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, mode, kind
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """A deterministic tar of (name, data or None for a directory, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in entries:
            if data is None:
                tar.addfile(_info(name, 0, mode, tarfile.DIRTYPE))
            else:
                tar.addfile(_info(name, len(data), mode), io.BytesIO(data))
    return buf.getvalue()


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(out: Path, ref: str, binaries: list[Path]) -> str:
    """Write the archive; return the manifest digest."""
    if not binaries:
        raise ValueError("at least one binary is needed")
    files: list[tuple[str, bytes | None, int]] = [("tmp", None, 0o1777)]
    files += [(b.name, b.read_bytes(), 0o755) for b in binaries]
    layer = _tar(files)
    arch = _ARCH.get(platform.machine(), platform.machine())
    config = _json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": [f"/{binaries[0].name}"],
                "Env": ["PATH=/"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
            "history": [{"created_by": "e2e/cluster/oci.py"}],
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": LAYER, "digest": _digest(layer), "size": len(layer)}],
        }
    )
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [
                {
                    "mediaType": MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "org.opencontainers.image.ref.name": ref,
                        "io.containerd.image.name": ref,
                    },
                }
            ],
        }
    )
    blobs = sorted({_digest(b).split(":")[1]: b for b in (layer, config, manifest)}.items())
    archive = _tar(
        [
            ("oci-layout", _json({"imageLayoutVersion": "1.0.0"}), 0o644),
            ("index.json", index, 0o644),
            ("blobs", None, 0o755),
            ("blobs/sha256", None, 0o755),
            *((f"blobs/sha256/{hexdigest}", data, 0o644) for hexdigest, data in blobs),
        ]
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(archive)
    tmp.replace(out)
    return _digest(manifest)


def refs(archive: Path) -> list[tuple[str, str]]:
    """(name, digest) of each image an OCI archive's index.json names.

    The name is what ``ctr images import`` registers: ``io.containerd.image.name``
    when present, else ``org.opencontainers.image.ref.name``. The archive is
    read with seeks only, so a multi-GB archive costs milliseconds.
    """
    with tarfile.open(archive, mode="r:") as tar:
        member = None
        for info in tar:
            if info.name.lstrip("./") == "index.json":
                member = info
                break
        if member is None:
            raise ValueError(f"{archive}: no index.json (not an OCI image layout archive)")
        handle = tar.extractfile(member)
        if handle is None:
            raise ValueError(f"{archive}: index.json is not a file")
        index = json.load(handle)
    found = []
    for descriptor in index.get("manifests", []):
        annotations = descriptor.get("annotations") or {}
        name = annotations.get("io.containerd.image.name") or annotations.get(
            "org.opencontainers.image.ref.name"
        )
        if name:
            found.append((name, descriptor["digest"]))
    return found


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "pack":
        print(build(Path(argv[1]), argv[2], [Path(a) for a in argv[3:]]))
        return 0
    if len(argv) == 2 and argv[0] == "refs":
        for name, digest in refs(Path(argv[1])):
            print(name, digest)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
