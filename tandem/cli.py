"""The ``tandem`` command line.

Subcommands import what they need lazily, so ``tandem validate`` works with
the core install alone (no router, operator or engine extras).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from tandem import __version__


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so ConfigMaps and scripts stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    from tandem.operator import validation

    problems = validation.validate_files([Path(p) for p in args.files])
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_INVALID
    print(f"{len(args.files)} file(s) valid")
    return EXIT_OK


def _cmd_render(args: argparse.Namespace) -> int:
    from tandem.operator import planning, validation

    try:
        pools = validation.load_pools(Path(args.file))
    except validation.InvalidPoolError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
        return EXIT_INVALID
    settings = planning.PlanSettings(router_image=args.router_image)
    objects = [obj for pool in pools for obj in planning.plan(pool, settings)]
    sys.stdout.write(yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100))
    return EXIT_OK


def _cmd_crd(args: argparse.Namespace) -> int:
    from tandem.operator import crd, reference

    wanted = {Path(args.output_dir) / crd.CRD_FILENAME: crd.render_yaml()}
    for extra in (Path("helm/tandem/crds") / crd.CRD_FILENAME,):
        if extra.parent.is_dir():
            wanted[extra] = wanted[Path(args.output_dir) / crd.CRD_FILENAME]
    readme = Path(args.readme)
    if readme.exists():
        wanted[readme] = reference.splice(readme.read_text(encoding="utf-8"))
    stale = [
        path
        for path, text in wanted.items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run `tandem crd`", file=sys.stderr)
        if stale:
            return EXIT_INVALID
        print("generated files are up to date")
        return EXIT_OK
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path], encoding="utf-8")
        print(path)
    return EXIT_OK


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand implemented by another module's ``main(argv)``."""

    def run(args: argparse.Namespace) -> int:
        try:
            main: Callable[[list[str]], int] = importlib.import_module(module).main
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "tandem":
                raise
            extra = _EXTRAS.get(module, "dev")
            print(
                f"tandem: this command needs {exc.name!r}, which is not installed: "
                f"pip install 'tandem[{extra}]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return main(list(args.rest))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Disaggregated prefill/decode LLM serving on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check InferencePool manifests offline")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("render", help="print every object the operator creates for a pool")
    p.add_argument("file", metavar="FILE")
    from tandem.operator.planning import DEFAULT_ROUTER_IMAGE

    p.add_argument("--router-image", default=DEFAULT_ROUTER_IMAGE, help="router image")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser(
        "crd", help="regenerate the CRD YAML (crds/, the chart) and the README reference"
    )
    p.add_argument("--output-dir", default="crds", help="where to write (default: crds)")
    p.add_argument("--readme", default="README.md", help="README to update the reference in")
    p.add_argument("--check", action="store_true", help="fail if a generated file is out of date")
    p.set_defaults(func=_cmd_crd)

    for name, module, text in _DELEGATED:
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module))
    return parser


_DELEGATED: list[tuple[str, str, str]] = [
    ("up", "tandem.local.cli", "run a pool on this machine: router, prefill and decode workers"),
    ("router", "tandem.router.cli", "run the gateway router"),
    ("operator", "tandem.operator.cli", "run the operator (kopf)"),
    ("emulate", "tandem.workers.emulator.cli", "run the engine emulator (speaks vLLM's API)"),
]
"""(subcommand, module with ``main(argv)``, help) for commands with their own parsers."""

_EXTRAS = {
    "tandem.local.cli": "router,emulator",
    "tandem.router.cli": "router",
    "tandem.operator.cli": "operator",
    "tandem.workers.emulator.cli": "emulator",
}
"""The extra that brings each delegated command's dependencies."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Delegated commands get their arguments untouched: argparse's REMAINDER does not
    # take a first argument that looks like an option (`tandem operator --kubeconfig x`).
    delegated = {name: module for name, module, _ in _DELEGATED}
    if argv and argv[0] in delegated:
        return _delegate(delegated[argv[0]])(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
