#!/usr/bin/env python3
"""Build Tandem's container images without a container engine or a registry.

    python3 images/build.py [--out DIR] NAME...      (NAME: tandem, vllm-cpu)

Usually run through ``scripts/build-images.sh``. What goes into an image is
written once, in ``images/<NAME>/Containerfile``; this program executes that
file's own instructions (a small subset of the Containerfile language) the way
a container engine would:

* ``FROM debian:<release>[-slim]`` becomes an ``mmdebstrap --variant=minbase``
  root filesystem of that release, from the machine's configured Debian mirror
  (docs, man pages and locales left out the way the -slim images leave them out);
  no other base image is supported.
* ``RUN`` executes in a chroot of the image's root filesystem, on an overlay
  mount in a private mount and PID namespace (``unshare``), with /proc, /sys, a
  minimal /dev and the host's resolv.conf mounted; the overlay's upper directory
  is the step's layer. ``RUN --mount=type=cache,id=ID,target=DIR`` binds a
  cache directory (id ``uv``: the host's uv cache, so wheels are not downloaded
  twice; any other id: a directory under the build cache).
* ``COPY [--chown=U:G] [--chmod=M] SRC... DEST`` copies from the build context
  (the repository root), honouring ``.dockerignore``.
* ``ENV``, ``ARG``, ``WORKDIR``, ``USER``, ``LABEL``, ``EXPOSE``,
  ``ENTRYPOINT``, ``CMD`` go into the image configuration as usual.

Any other instruction, a second ``FROM`` (multi-stage), ``COPY --from`` or
another ``RUN --mount`` type fails the build with a message naming it.

Every step is cached by a key chained from the steps before it (for ``COPY``,
the content of the files it copies). The whole image is keyed by the
Containerfile, every file its ``COPY`` steps read, and this program with
``scripts/build-images.sh``: when that key matches the last build, nothing runs
and the program prints "up to date".

Output: ``<out>/<image>.tar``, an OCI image layout packed as a tar (layers
uncompressed, media type ``application/vnd.oci.image.layer.v1.tar``), its
index annotated with the full reference (``org.opencontainers.image.ref.name``
and ``io.containerd.image.name``), so ``ctr images import FILE`` names it
``ghcr.io/tandem-dev/<image>:<version>``; and ``<out>/<image>.json`` with the
reference, digests, sizes and the key.

Needs root, mmdebstrap, unshare (util-linux), overlayfs, GNU tar. Standard
library only; it must not import the ``tandem`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGISTRY = "ghcr.io/tandem-dev"
IMAGES = {
    # NAME on the command line: (Containerfile, image name)
    "tandem": ("images/tandem/Containerfile", "tandem"),
    "vllm-cpu": ("images/vllm-cpu/Containerfile", "tandem-vllm-cpu"),
}
STEP_FORMAT = "tandem-image-step-v1"
"""Part of every step key: bump it when the way steps execute changes."""
BASE_FORMAT = "tandem-image-base-v1"
DEBIAN_RELEASES = ("bullseye", "bookworm", "trixie")
SLIM_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[build-images {time.monotonic() - _t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chain(*parts: object) -> str:
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())


# --------------------------------------------------------------------------- Containerfile


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str  # the rest of the line, continuations joined
    line: int
    original: str


def parse_containerfile(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = []
        while True:
            stripped = line.rstrip()
            if not stripped.endswith("\\") or i >= len(lines):
                parts.append(stripped.strip())
                break
            parts.append(stripped[:-1].strip())
            # comment and blank lines inside a continuation are skipped, as Docker does
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                i += 1
            if i >= len(lines):
                break
            line = lines[i]
            i += 1
        text = " ".join(p for p in parts if p)
        cmd, _, rest = text.partition(" ")
        out.append(Instruction(cmd.upper(), rest.strip(), start + 1, text))
    return out


_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def substitute(text: str, env: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("plain")
        value = env.get(name, "")
        if m.group("op") == "-":
            return value or m.group("word")
        if m.group("op") == "+":
            return m.group("word") if value else ""
        return value

    return _VAR.sub(repl, text.replace("\\$", "\0")).replace("\0", "$")


def json_or_shell(args: str) -> tuple[list[str], bool]:
    """(argv, is_exec_form)."""
    if args.startswith("["):
        try:
            value = json.loads(args)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value, True
    return ["/bin/sh", "-c", args], False


def parse_kv(args: str, env: dict[str, str], what: str, line: int) -> list[tuple[str, str]]:
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        # legacy form: ENV KEY value with spaces
        key, _, value = args.partition(" ")
        return [(key, substitute(value.strip(), env))]
    pairs = []
    for word in shlex.split(args, posix=True):
        if "=" not in word:
            raise BuildError(f"line {line}: {what}: expected KEY=VALUE, got {word!r}")
        key, _, value = word.partition("=")
        pairs.append((key, substitute(value, env)))
    return pairs


def split_flags(args: str) -> tuple[list[str], str]:
    flags = []
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.lstrip()
    return flags, rest


# --------------------------------------------------------------------------- build context


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i)
            if j < 0:
                out += re.escape(c)
            else:
                cls = pattern[i + 1 : j]
                if cls.startswith("^") or cls.startswith("!"):
                    cls = "^" + cls[1:]
                out += f"[{cls}]"
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """``.dockerignore`` (or ``.containerignore``) semantics: last match wins, ``!`` re-includes,
    a pattern that matches a directory matches everything below it."""

    def __init__(self, root: Path) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        self.negated: list[str] = []
        self.source = None
        for name in (".containerignore", ".dockerignore"):
            path = root / name
            if path.is_file():
                self.source = path
                for raw in path.read_text(encoding="utf-8").splitlines():
                    line = raw.strip()
                    if not line or line.startswith("#"):
                        continue
                    negate = line.startswith("!")
                    if negate:
                        line = line[1:].strip()
                    line = os.path.normpath(line.lstrip("/"))
                    self.rules.append((_pattern_regex(line), negate))
                    if negate:
                        self.negated.append(line)
                break

    def may_reinclude_below(self, rel: str) -> bool:
        """Could a ``!`` rule match something below the excluded folder REL?"""
        depth = rel.count("/") + 1
        for pattern in self.negated:
            parts = pattern.split("/")
            if any("**" in part for part in parts[:depth]):
                return True
            if len(parts) > depth and _pattern_regex("/".join(parts[:depth])).match(rel):
                return True
        return False

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        result = False
        for regex, negate in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


def context_files(
    root: Path, sources: list[str], ignore: DockerIgnore, line: int
) -> list[tuple[str, str]]:
    """(relative source path, path relative to DEST) of everything a COPY reads, sorted."""
    out: list[tuple[str, str]] = []
    for src in sources:
        norm = os.path.normpath(src.lstrip("/"))
        if norm.startswith(".."):
            raise BuildError(f"line {line}: COPY source {src!r} is outside the build context")
        base = root / norm if norm != "." else root
        if not base.exists() and not base.is_symlink():
            raise BuildError(f"line {line}: COPY source {src!r} does not exist")
        if base.is_dir() and not base.is_symlink():
            found = False
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                reldir = os.path.relpath(dirpath, root)
                reldir = "" if reldir == "." else reldir
                keep = []
                for d in dirnames:
                    rel = f"{reldir}/{d}" if reldir else d
                    full = Path(dirpath) / d
                    if full.is_symlink():
                        if not ignore.excluded(rel):
                            out.append((rel, os.path.relpath(rel, norm) if norm != "." else rel))
                            found = True
                        continue
                    # An excluded folder is entered only when a ! rule may re-include below it.
                    if not ignore.excluded(rel) or ignore.may_reinclude_below(rel):
                        keep.append(d)
                dirnames[:] = keep
                for f in sorted(filenames):
                    rel = f"{reldir}/{f}" if reldir else f
                    if not ignore.excluded(rel):
                        out.append((rel, os.path.relpath(rel, norm) if norm != "." else rel))
                        found = True
            if not found:
                raise BuildError(
                    f"line {line}: COPY {src!r}: every file is excluded by .dockerignore"
                )
        else:
            if ignore.excluded(norm):
                raise BuildError(f"line {line}: COPY {src!r} is excluded by .dockerignore")
            out.append((norm, os.path.basename(norm)))
    return sorted(set(out))


def hash_files(root: Path, files: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rel, dest in files:
        path = root / rel
        st = path.lstat()
        h.update(f"{rel}\0{dest}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(b"L" + os.readlink(path).encode())
        else:
            with open(path, "rb") as f:
                h.update(b"F" + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- base root filesystem


def debian_sources(release: str) -> str:
    """deb822 sources for RELEASE from the machine's configured Debian mirror."""
    text = ""
    for candidate in (Path("/etc/apt/sources.list.d/debian.sources"),):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
    main = "http://deb.debian.org/debian"
    security = "http://deb.debian.org/debian-security"
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(":", 1)
            for line in stanza.splitlines()
            if ":" in line and not line.startswith("#")
        )
        uris = fields.get("URIs", "").split()
        suites = fields.get("Suites", "").split()
        if not uris:
            continue
        if any(s.endswith("-security") for s in suites):
            security = uris[0]
        else:
            main = uris[0]
    return (
        f"Types: deb\nURIs: {main}\nSuites: {release} {release}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {release}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def base_release(image: str, line: int) -> str:
    m = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)(-slim)?", image)
    if not m or m.group(1) not in DEBIAN_RELEASES:
        raise BuildError(
            f"line {line}: FROM {image}: only debian:<release>[-slim] is supported "
            f"({', '.join(DEBIAN_RELEASES)}): it is built with mmdebstrap"
        )
    return m.group(1)


def ensure_base(cache: Path, release: str) -> tuple[str, Path]:
    sources = debian_sources(release)
    mmdebstrap = shutil.which("mmdebstrap")
    if not mmdebstrap:
        raise BuildError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    key = chain(BASE_FORMAT, release, sources, SLIM_DPKG_OPTS)[:32]
    root = cache / "base" / key
    if (root / "done").is_file():
        log(f"base debian:{release}: cached ({key[:12]})")
        return key, root / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "debian.sources").write_text(sources, encoding="utf-8")
    start = time.monotonic()
    log(f"base debian:{release}: mmdebstrap --variant=minbase (from {sources.split()[3]})")
    cmd = [
        mmdebstrap, "--variant=minbase", "--mode=root", "--format=directory", "--quiet",
        *(f"--dpkgopt={o}" for o in SLIM_DPKG_OPTS),
        release, str(root / "rootfs"), str(root / "debian.sources"),
    ]  # fmt: skip
    run_checked(cmd, "mmdebstrap")
    rootfs = root / "rootfs"
    for rel in ("etc/resolv.conf", "etc/hostname", "etc/hosts"):
        p = rootfs / rel
        if p.is_symlink() or not p.exists():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            p.write_text("" if rel != "etc/hosts" else "127.0.0.1 localhost\n::1 localhost\n")
    for rel in ("tmp",):
        (rootfs / rel).chmod(0o1777)
    (root / "done").write_text(key)
    log(f"base debian:{release}: built in {time.monotonic() - start:.1f}s")
    return key, rootfs


def run_checked(cmd: list[str], what: str, **kw: object) -> None:
    proc = subprocess.run(cmd, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)[:300]}")


# --------------------------------------------------------------------------- steps

STEP_SCRIPT = r"""
set -eu
M="$TANDEM_MERGED"
if [ -n "${TANDEM_UPPER:-}" ]; then
  mount -t overlay overlay -o "lowerdir=$TANDEM_LOWER,upperdir=$TANDEM_UPPER,workdir=$TANDEM_WORK,redirect_dir=off,metacopy=off,index=off" "$M"
else
  mount --bind "$TANDEM_LOWER" "$M"
fi
if [ "$TANDEM_MODE" = copy ]; then
  exec tar -x --numeric-owner --same-permissions --no-overwrite-dir -f - -C "$M"
fi
mount -t proc proc "$M/proc"
mount -t sysfs -o ro sysfs "$M/sys" 2>/dev/null || true
mount -t tmpfs -o mode=755,nosuid tandem-dev "$M/dev"
for d in null zero full random urandom tty; do
  : > "$M/dev/$d"; mount --bind "/dev/$d" "$M/dev/$d"
done
mkdir -p "$M/dev/shm" "$M/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$M/dev/shm"
ln -s /proc/self/fd "$M/dev/fd"; ln -s /proc/self/fd/0 "$M/dev/stdin"
ln -s /proc/self/fd/1 "$M/dev/stdout"; ln -s /proc/self/fd/2 "$M/dev/stderr"
# The host's CA bundle (a TLS-intercepting proxy's CA, say) for this step only: never in a layer.
mount -t tmpfs -o mode=755 tandem-run "$M/run"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$M/run/tandem-build"; cp /etc/ssl/certs/ca-certificates.crt "$M/run/tandem-build/ca-certificates.crt"
fi
if [ -f /etc/resolv.conf ] && [ -f "$M/etc/resolv.conf" ]; then
  mount --bind /etc/resolv.conf "$M/etc/resolv.conf"
fi
# cache mounts: lines "HOSTDIR<TAB>TARGET"
if [ -n "${TANDEM_CACHES:-}" ]; then
  printf '%s\n' "$TANDEM_CACHES" | while IFS="$(printf '\t')" read -r src dst; do
    mkdir -p "$src" "$M$dst"; mount --bind "$src" "$M$dst"
  done
fi
exec chroot $TANDEM_USERSPEC "$M" /usr/bin/env -i "$@"
"""


HOST_CA = "/run/tandem-build/ca-certificates.crt"


def host_env() -> dict[str, str]:
    """Environment a step gets from this machine and that no image keeps: its CA bundle
    (copied into the step's /run) and its proxy settings. Not part of any cache key."""
    out = {k: v for k, v in os.environ.items()
           if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}  # fmt: skip
    if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        for k in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            out[k] = HOST_CA
    return out


@dataclass
class State:
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    exposed: dict[str, dict[str, str]] = field(default_factory=dict)
    history: list[dict[str, object]] = field(default_factory=list)


@dataclass
class Layer:
    key: str
    path: Path  # directory (an overlay upper, or the base rootfs)
    is_base: bool = False


class Builder:
    def __init__(self, out: Path, build_args: dict[str, str]) -> None:
        self.out = out
        self.cache = out / "cache"
        self.build_args = build_args
        self.used_keys: set[str] = set()

    # -- cache mounts
    def cache_dir(self, ident: str) -> Path:
        if ident == "uv":
            found = os.environ.get("UV_CACHE_DIR")
            if not found and shutil.which("uv"):
                with contextlib.suppress(subprocess.CalledProcessError):
                    found = subprocess.run(
                        ["uv", "cache", "dir"], capture_output=True, text=True, check=True
                    ).stdout.strip()
            return Path(found or Path.home() / ".cache" / "uv")
        return self.cache / "mounts" / re.sub(r"[^A-Za-z0-9_.-]", "_", ident)

    def run_step(
        self,
        layers: list[Layer],
        key: str,
        mode: str,
        argv: list[str],
        env: dict[str, str],
        userspec: str = "",
        caches: list[tuple[Path, str]] | None = None,
        stdin: bytes | None = None,
    ) -> Layer | None:
        """Run one step on top of LAYERS; its overlay upper becomes the new layer (cached by KEY)."""
        self.used_keys.add(key)
        home = self.cache / "layers" / key
        if (home / "done").is_file():
            empty = (home / "done").read_text() == "empty"
            return None if empty else Layer(key, home / "diff")
        shutil.rmtree(home, ignore_errors=True)
        (home / "diff").mkdir(parents=True)
        (home / "work").mkdir()
        (home / "merged").mkdir()
        lower = ":".join(str(layer.path) for layer in reversed(layers))
        step_env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "TANDEM_MERGED": str(home / "merged"),
            "TANDEM_LOWER": lower,
            "TANDEM_UPPER": str(home / "diff"),
            "TANDEM_WORK": str(home / "work"),
            "TANDEM_MODE": mode,
            "TANDEM_USERSPEC": f"--userspec={userspec}" if userspec else "",
            "TANDEM_CACHES": "\n".join(f"{src}\t{dst}" for src, dst in caches or []),
        }
        envv = [f"{k}={v}" for k, v in {**host_env(), **env}.items()]
        cmd = [
            "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
            "/bin/sh", "-c", STEP_SCRIPT, "step", *envv, *argv,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=step_env, input=stdin, stdout=sys.stderr)
        if proc.returncode != 0:
            raise BuildError(f"step failed (exit {proc.returncode})")
        shutil.rmtree(home / "work", ignore_errors=True)
        with contextlib.suppress(OSError):
            (home / "merged").rmdir()
        empty = not any((home / "diff").iterdir())
        (home / "done").write_text("empty" if empty else "layer")
        return None if empty else Layer(key, home / "diff")

    # -- the Containerfile
    def build(self, name: str, containerfile: Path, ref: str) -> dict[str, object]:
        instructions = parse_containerfile(containerfile)
        ignore = DockerIgnore(REPO)
        state = State()
        layers: list[Layer] = []
        key = ""
        seen_from = False
        step_times: list[tuple[str, float]] = []
        for ins in instructions:
            t0 = time.monotonic()
            label = f"{ins.cmd} {ins.args}"[:100]
            scope = {**state.args, **state.env}
            if ins.cmd == "ARG":
                for word in shlex.split(ins.args):
                    k, eq, default = word.partition("=")
                    val = self.build_args.get(k, substitute(default, scope) if eq else "")
                    state.args[k] = val
                key = chain(key, "ARG", ins.args, state.args)
                continue
            if ins.cmd == "FROM":
                if seen_from:
                    raise BuildError(
                        f"line {ins.line}: a second FROM (multi-stage) is not supported"
                    )
                seen_from = True
                words = substitute(ins.args, scope).split()
                if len(words) != 1 or words[0].startswith("--"):
                    raise BuildError(f"line {ins.line}: FROM: only `FROM image` is supported")
                release = base_release(words[0], ins.line)
                base_key, rootfs = ensure_base(self.cache, release)
                self.used_keys.add(base_key)
                layers = [Layer(base_key, rootfs, is_base=True)]
                key = chain(STEP_FORMAT, base_key, state.args)
                state.history.append(
                    {"created_by": f"FROM {words[0]} (mmdebstrap minbase {release})"}
                )
                continue
            if not seen_from:
                raise BuildError(f"line {ins.line}: {ins.cmd} before FROM")
            if ins.cmd == "ENV":
                for k, v in parse_kv(ins.args, scope, "ENV", ins.line):
                    state.env[k] = v
                    scope[k] = v
                key = chain(key, "ENV", state.env)
            elif ins.cmd == "LABEL":
                state.labels.update(parse_kv(ins.args, scope, "LABEL", ins.line))
            elif ins.cmd == "EXPOSE":
                for port in substitute(ins.args, scope).split():
                    state.exposed[port if "/" in port else f"{port}/tcp"] = {}
            elif ins.cmd == "USER":
                state.user = substitute(ins.args, scope).strip()
                key = chain(key, "USER", state.user)
            elif ins.cmd in ("ENTRYPOINT", "CMD"):
                argv, _ = json_or_shell(ins.args)
                if ins.cmd == "ENTRYPOINT":
                    state.entrypoint = argv
                    state.cmd = None
                else:
                    state.cmd = argv
            elif ins.cmd == "WORKDIR":
                path = substitute(ins.args, scope).strip()
                state.workdir = path if path.startswith("/") else os.path.join(state.workdir, path)
                key = chain(key, "WORKDIR", state.workdir)
                layer = self.run_step(
                    layers, key[:32], "run", ["/bin/mkdir", "-p", state.workdir], {}
                )
                if layer:
                    layers.append(layer)
            elif ins.cmd == "COPY":
                layer, key = self.copy(ins, state, scope, ignore, layers, key)
                if layer:
                    layers.append(layer)
                state.history.append(
                    {"created_by": f"COPY {ins.args}", "empty_layer": layer is None}
                )
            elif ins.cmd == "RUN":
                layer, key = self.run(ins, state, layers, key)
                if layer:
                    layers.append(layer)
                state.history.append(
                    {"created_by": f"RUN {ins.args}", "empty_layer": layer is None}
                )
            else:
                raise BuildError(
                    f"line {ins.line}: {ins.cmd} is not supported by images/build.py "
                    "(supported: FROM ARG ENV LABEL EXPOSE USER WORKDIR COPY RUN ENTRYPOINT CMD)"
                )
            dt = time.monotonic() - t0
            if dt > 0.5:
                step_times.append((label, dt))
        if not seen_from:
            raise BuildError(f"{containerfile}: no FROM")
        for label, dt in step_times:
            log(f"  {dt:7.1f}s  {label}")
        return self.write_image(name, ref, layers, state)

    def copy(self, ins: Instruction, state: State, scope: dict[str, str], ignore: DockerIgnore,
             layers: list[Layer], key: str) -> tuple[Layer | None, str]:  # fmt: skip
        flags, rest = split_flags(ins.args)
        chown = chmod = None
        for flag in flags:
            name, _, value = flag[2:].partition("=")
            if name == "chown":
                chown = substitute(value, scope)
            elif name == "chmod":
                chmod = int(value, 8)
            else:
                raise BuildError(f"line {ins.line}: COPY --{name} is not supported")
        words, exec_form = json_or_shell(rest)
        words = words if exec_form else shlex.split(rest)
        words = [substitute(w, scope) for w in words]
        if len(words) < 2:
            raise BuildError(f"line {ins.line}: COPY needs a source and a destination")
        *sources, dest = words
        if not dest.startswith("/"):
            dest = os.path.join(state.workdir, dest)
        files = context_files(REPO, sources, ignore, ins.line)
        into_dir = (
            dest.endswith("/") or len(sources) > 1 or any((REPO / s).is_dir() for s in sources)
        )
        uid = gid = 0
        if chown:
            u, _, g = chown.partition(":")
            if not (u.isdigit() and (not g or g.isdigit())):
                raise BuildError(f"line {ins.line}: COPY --chown needs numeric ids, got {chown!r}")
            uid, gid = int(u), int(g or u)
        key = chain(key, "COPY", ins.args, hash_files(REPO, files), dest, into_dir)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            made: set[str] = set()
            for rel, sub in files:
                target = os.path.join(dest, sub) if into_dir else dest
                target = os.path.normpath(target).lstrip("/")
                # parent folders created by the copy (not those that exist below)
                parts = target.split("/")[:-1]
                for k in range(len(parts)):
                    d = "/".join(parts[: k + 1])
                    if d in made or any((layer.path / d).exists() for layer in layers):
                        continue
                    made.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = (
                        tarfile.DIRTYPE,
                        0o755,
                        uid,
                        gid,
                        int(time.time()),
                    )
                    tar.addfile(ti)
                ti = tar.gettarinfo(str(REPO / rel), arcname=target)
                ti.uid, ti.gid, ti.uname, ti.gname = uid, gid, "", ""
                if chmod is not None:
                    ti.mode = chmod
                if ti.isreg():
                    with open(REPO / rel, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
        layer = self.run_step(layers, key[:32], "copy", [], {}, stdin=buf.getvalue())
        return layer, key

    def run(
        self, ins: Instruction, state: State, layers: list[Layer], key: str
    ) -> tuple[Layer | None, str]:
        flags, rest = split_flags(ins.args)
        caches: list[tuple[Path, str]] = []
        for flag in flags:
            if not flag.startswith("--mount="):
                raise BuildError(f"line {ins.line}: RUN {flag.split('=')[0]} is not supported")
            opts = dict(kv.partition("=")[::2] for kv in flag[len("--mount=") :].split(","))
            if opts.get("type") != "cache":
                raise BuildError(
                    f"line {ins.line}: RUN --mount type {opts.get('type')!r} is not supported (only cache)"
                )
            target = opts.get("target") or opts.get("dst") or opts.get("destination")
            if not target:
                raise BuildError(f"line {ins.line}: RUN --mount=type=cache needs target=")
            caches.append((self.cache_dir(opts.get("id") or target), target))
        argv, _ = json_or_shell(rest)
        env = {**state.args, **state.env}
        env.setdefault(
            "HOME", "/root" if not state.user or state.user.split(":")[0] in ("0", "root") else "/"
        )
        key = chain(key, "RUN", rest, [c[1] for c in caches], env, state.user, state.workdir)
        userspec = ""
        if state.user:
            u, _, g = state.user.partition(":")
            userspec = f"{u}:{g or u}"
        wrapped = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', state.workdir, *argv]
        cached = (self.cache / "layers" / key[:32] / "done").is_file()
        if not cached:
            log(f"RUN {rest[:90]}{'...' if len(rest) > 90 else ''}")
        layer = self.run_step(layers, key[:32], "run", wrapped, env, userspec, caches)
        return layer, key

    # -- output
    def write_image(
        self, name: str, ref: str, layers: list[Layer], state: State
    ) -> dict[str, object]:
        config_env = [f"{k}={v}" for k, v in state.env.items()]
        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / f"{name}.tar"
        tmp = self.out / f".{name}.tar.tmp"
        start = time.monotonic()
        diff_ids: list[str] = []
        descriptors: list[dict[str, object]] = []
        with open(tmp, "wb") as out:
            _dir_entry(out, "blobs/")
            _dir_entry(out, "blobs/sha256/")
            for layer in layers:
                t0 = time.monotonic()
                digest, size = write_layer_member(out, layer)
                diff_ids.append(f"sha256:{digest}")
                descriptors.append(
                    {"mediaType": LAYER_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": size}
                )
                log(f"layer {digest[:12]} {size / 1e6:9.1f} MB in {time.monotonic() - t0:5.1f}s")
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            config: dict[str, object] = {
                "created": created,
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "User": state.user,
                    "Env": config_env,
                    "Entrypoint": state.entrypoint,
                    "Cmd": state.cmd,
                    "WorkingDir": state.workdir,
                    "Labels": state.labels,
                    "ExposedPorts": state.exposed,
                },
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created": created, **h} for h in state.history],
            }
            config_blob = json.dumps(config, indent=None, sort_keys=True).encode()
            config_digest = sha256_bytes(config_blob)
            _file_entry(out, f"blobs/sha256/{config_digest}", config_blob)
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{config_digest}",
                    "size": len(config_blob),
                },
                "layers": descriptors,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
            manifest_blob = json.dumps(manifest, sort_keys=True).encode()
            manifest_digest = sha256_bytes(manifest_blob)
            _file_entry(out, f"blobs/sha256/{manifest_digest}", manifest_blob)
            index = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{manifest_digest}",
                        "size": len(manifest_blob),
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "org.opencontainers.image.ref.name": ref,
                            "io.containerd.image.name": ref,
                        },
                    }
                ],
            }
            _file_entry(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            _file_entry(out, "index.json", json.dumps(index, indent=2).encode())
            out.write(b"\0" * 1024)
        os.replace(tmp, final)
        total = final.stat().st_size
        log(f"wrote {final.relative_to(REPO) if final.is_relative_to(REPO) else final}: "
            f"{total / 1e6:.1f} MB, {len(layers)} layers, in {time.monotonic() - start:.1f}s")  # fmt: skip
        return {
            "ref": ref,
            "tar": str(final),
            "manifestDigest": f"sha256:{manifest_digest}",
            "configDigest": f"sha256:{config_digest}",
            "layers": [{"digest": d["digest"], "size": d["size"]} for d in descriptors],
            "size": total,
        }


# --------------------------------------------------------------------------- tar writing


class _HashWriter:
    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.n


def _pad(out: io.BufferedWriter, size: int) -> None:
    if size % 512:
        out.write(b"\0" * (512 - size % 512))


def _dir_entry(out: io.BufferedWriter, name: str) -> None:
    ti = tarfile.TarInfo(name.rstrip("/"))
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
    out.write(ti.tobuf(format=tarfile.GNU_FORMAT))


def _file_entry(out: io.BufferedWriter, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o444, int(time.time())
    out.write(ti.tobuf(format=tarfile.GNU_FORMAT))
    out.write(data)
    _pad(out, len(data))


def write_layer_member(out: io.BufferedWriter, layer: Layer) -> tuple[str, int]:
    """Stream LAYER as an uncompressed tar straight into the outer tar: reserve the member's
    header, write and hash the layer, then go back and fill in its name (the digest) and size."""
    header_at = out.tell()
    out.write(b"\0" * 512)
    hw = _HashWriter(out)
    with tarfile.open(fileobj=hw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20) as tar:  # type: ignore[call-overload]
        add_tree(tar, layer.path, layer.is_base)
    size = hw.n
    digest = hw.h.hexdigest()
    _pad(out, size)
    end = out.tell()
    ti = tarfile.TarInfo(f"blobs/sha256/{digest}")
    ti.size, ti.mode, ti.mtime = size, 0o444, int(time.time())
    header = ti.tobuf(format=tarfile.GNU_FORMAT)
    assert len(header) == 512
    out.seek(header_at)
    out.write(header)
    out.seek(end)
    return digest, size


_BASE_EMPTY = {
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var/cache/apt/archives/partial",
    "var/lib/apt/lists/partial",
}


def add_tree(tar: tarfile.TarFile, root: Path, is_base: bool) -> None:
    """Add ROOT's content (names relative to it), overlay whiteouts turned into OCI ones."""

    def walk(rel: str) -> None:
        path = root / rel if rel else root
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and not is_base:
                wh = tarfile.TarInfo(f"{rel}/.wh.{entry.name}" if rel else f".wh.{entry.name}")
                wh.mtime = int(st.st_mtime)
                tar.addfile(wh)
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            ti = tar.gettarinfo(entry.path, arcname=name)
            ti.uname = ti.gname = ""
            ti.mtime = int(st.st_mtime)
            if ti.isreg():
                with open(entry.path, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)
            if stat.S_ISDIR(st.st_mode):
                if not is_base:
                    with contextlib.suppress(OSError):
                        if os.getxattr(entry.path, "trusted.overlay.opaque") == b"y":
                            op = tarfile.TarInfo(f"{name}/.wh..wh..opq")
                            op.mtime = int(st.st_mtime)
                            tar.addfile(op)
                if is_base and name in _BASE_EMPTY:
                    continue
                walk(name)

    walk("")


# --------------------------------------------------------------------------- driver


def image_key(containerfile: Path, build_args: dict[str, str]) -> str:
    """Containerfile + every file its COPY steps read (after .dockerignore) + this builder."""
    ignore = DockerIgnore(REPO)
    h = hashlib.sha256()
    h.update(containerfile.read_bytes())
    for extra in (Path(__file__), REPO / "scripts" / "build-images.sh"):
        if extra.is_file():
            h.update(extra.read_bytes())
    h.update(json.dumps(build_args, sort_keys=True).encode())
    if ignore.source:
        h.update(ignore.source.read_bytes())
    scope: dict[str, str] = dict(build_args)
    for ins in parse_containerfile(containerfile):
        if ins.cmd == "COPY":
            flags, rest = split_flags(ins.args)
            words, exec_form = json_or_shell(rest)
            words = words if exec_form else shlex.split(rest)
            if any(f.startswith("--from") for f in flags):
                raise BuildError(f"line {ins.line}: COPY --from is not supported")
            *sources, _ = [substitute(w, scope) for w in words]
            h.update(hash_files(REPO, context_files(REPO, sources, ignore, ins.line)).encode())
        elif ins.cmd in ("ARG", "ENV"):
            for word in shlex.split(ins.args):
                k, eq, v = word.partition("=")
                if eq:
                    scope.setdefault(k, v)
    return h.hexdigest()


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def garbage_collect(cache: Path, keep: set[str]) -> None:
    """Drop cached layers no image's latest build uses."""
    layers = cache / "layers"
    if not layers.is_dir():
        return
    freed = 0
    for d in layers.iterdir():
        # A day's grace: the layers of a build that failed half-way stay reusable.
        if d.name not in keep and time.time() - d.stat().st_mtime > 86400:
            freed += 1
            shutil.rmtree(d, ignore_errors=True)
    if freed:
        log(f"cache: removed {freed} unused layer(s)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="images/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=["tandem"], metavar="NAME",
                        help=f"images to build: {', '.join(IMAGES)} or all")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / ".tandem" / "images"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument(
        "--no-cache", action="store_true", help="ignore cached steps (the base rootfs stays)"
    )
    args = parser.parse_args(argv)
    names = list(IMAGES) if "all" in args.names else args.names
    for n in names:
        if n not in IMAGES:
            parser.error(f"unknown image {n!r} (known: {', '.join(IMAGES)}, all)")
    if os.geteuid() != 0:
        print("images/build.py: needs root (mmdebstrap, mounts, chroot)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    (out / "cache").mkdir(parents=True, exist_ok=True)
    version = project_version()
    build_args = {"TANDEM_VERSION": version}
    with open(out / "cache" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rc = 0
        for n in names:
            containerfile_rel, image = IMAGES[n]
            containerfile = REPO / containerfile_rel
            ref = f"{REGISTRY}/{image}:{version}"
            meta_path = out / f"{image}.json"
            start = time.monotonic()
            try:
                key = image_key(containerfile, build_args)
                meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
                if (not args.force and not args.no_cache and meta.get("key") == key
                        and (out / f"{image}.tar").is_file()):  # fmt: skip
                    log(
                        f"{ref}: up to date ({out / f'{image}.tar'}, {meta.get('size', 0) / 1e6:.1f} MB)"
                    )
                    continue
                log(f"{ref}: building from {containerfile_rel}")
                builder = Builder(out, build_args)
                if args.no_cache:
                    shutil.rmtree(out / "cache" / "layers", ignore_errors=True)
                result = builder.build(image, containerfile, ref)
                result["key"] = key
                result["seconds"] = round(time.monotonic() - start, 1)
                result["cacheKeys"] = sorted(builder.used_keys)
                meta_path.write_text(json.dumps(result, indent=2) + "\n")
                log(f"{ref}: built in {result['seconds']}s -> {result['tar']}")
            except BuildError as exc:
                log(f"{ref}: FAILED: {exc}")
                rc = 1
                break
        keep: set[str] = set()
        for _, image in IMAGES.values():
            p = out / f"{image}.json"
            if p.is_file():
                keep |= {k[:32] for k in json.loads(p.read_text()).get("cacheKeys", [])}
        if rc == 0:
            garbage_collect(out / "cache", keep)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
