"""A vLLM plugin that stops NIXL's UCX progress thread from busy-polling a core.

NIXL's Python API (``nixl_agent`` in ``nixl_cu12/_api.py``, ``nixl_cu13/_api.py``)
builds the C++ agent config itself and hard-codes ``pthrDelay = 0``; the UCX backend
turns that delay into the timeout of the progress thread's ``poll()`` (rounded up to
whole milliseconds), so a 0 is a ``poll(fds, n, 0)`` loop: one core at ~95-100 %
in every idle worker. vLLM builds the agent itself too (``NixlConnector``) and
exposes only ``num_threads`` and ``backends``, and no environment variable reaches
the delay. On a few cores that spinning thread helped starve a decode worker until
the prefill's 30 s KV lease expired (docs: DESIGN.md, "vLLM in pods").

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes at
start (API server, engine core, workers), before any NIXL agent exists;
:func:`register` is ours (pyproject.toml). It patches nothing at once and imports
nothing heavy: it hooks the import of NIXL's ``_api`` module and, there, swaps the
module's handle on the C++ bindings (``nixlBind``) for a thin proxy whose
``nixlAgent(name, config)`` adjusts the finished config (progress-thread delay, or
no progress thread) and calls the real constructor. Nothing else of NIXL or vLLM
changes. Without NIXL installed it does nothing.

``TANDEM_NIXL_PROGRESS_THREAD`` chooses:

* unset or empty: the progress thread polls with a 1000 us timeout (UCX's file
  descriptors still wake it at once; the timeout is NIXL's workaround for fds
  that do not), the delay upstream NIXL meant to default to;
* a whole number of microseconds (>= 1): that timeout;
* ``off``: no progress thread; the caller's own calls (vLLM polls notifications
  and transfer states every engine step) progress the UCX workers;
* ``busy``: NIXL's default left alone (``pthrDelay = 0``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, Literal

ENV: Final = "TANDEM_NIXL_PROGRESS_THREAD"
DEFAULT_DELAY_US: Final = 1000

BACKEND_API_MODULES: Final = frozenset({"nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api"})
"""Where ``nixl_agent`` lives: ``import nixl`` imports the wheel for the machine's CUDA
(or ROCm) and puts its ``_api`` into ``sys.modules`` as ``nixl._api`` too (the
``nixl/_api.py`` file itself is a type stub that is never executed)."""

# A child of vLLM's logger: in a worker the line lands in vLLM's log with its format.
logger = logging.getLogger("vllm.plugins.tandem_nixl_tuning")

Mode = Literal["poll", "off", "busy"]


@dataclass(frozen=True)
class Setting:
    mode: Mode
    delay_us: int = DEFAULT_DELAY_US

    def describe(self) -> str:
        if self.mode == "off":
            return "no progress thread (the caller's calls progress UCX)"
        if self.mode == "busy":
            return "NIXL's default progress thread (pthrDelay 0: busy poll)"
        return f"a progress thread that polls with a {self.delay_us} us timeout"


def setting_from_env(env: Mapping[str, str] | None = None) -> Setting:
    """The setting ``TANDEM_NIXL_PROGRESS_THREAD`` asks for; an unreadable value
    is logged and gives the default."""
    raw = (os.environ if env is None else env).get(ENV, "").strip().lower()
    if raw in ("", "poll", "default"):
        return Setting("poll")
    if raw in ("off", "busy"):
        return Setting("off" if raw == "off" else "busy")
    try:
        delay = int(raw)
    except ValueError:
        delay = 0
    if delay >= 1:
        return Setting("poll", delay)
    logger.warning(
        "%s=%r is not 'off', 'busy' or a delay >= 1 us; using %d us",
        ENV, raw, DEFAULT_DELAY_US,
    )  # fmt: skip
    return Setting("poll")


def tune_config(config: Any, setting: Setting) -> None:
    """Adjust a NIXL C++ agent config (``nixlAgentConfig``) in place."""
    if setting.mode == "off":
        config.useProgThread = False
    elif setting.mode == "poll":
        # The UCX backend never sleeps less than a millisecond for a nonzero delay.
        config.pthrDelay = max(int(config.pthrDelay), setting.delay_us)


_logged = False
_log_lock = threading.Lock()


def _log_once(agent_name: str, setting: Setting) -> None:
    global _logged
    with _log_lock:
        if _logged:
            return
        _logged = True
    logger.info(
        "tandem: NIXL agent %s gets %s instead of NIXL's busy-polling one (%s=busy keeps it)",
        agent_name, setting.describe(), ENV,
    )  # fmt: skip


class TunedBindings:
    """NIXL's bindings module as ``nixl_agent`` sees it, but for ``nixlAgent``,
    which adjusts the config it is given before the agent (and its threads) starts."""

    def __init__(self, bindings: ModuleType | Any, setting: Setting) -> None:
        self._tandem_bindings = bindings
        self._tandem_setting = setting

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tandem_bindings, name)

    def nixlAgent(self, name: str, config: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802  # NIXL's name
        tune_config(config, self._tandem_setting)
        _log_once(name, self._tandem_setting)
        return self._tandem_bindings.nixlAgent(name, config, *args, **kwargs)


def patch_api_module(module: ModuleType, setting: Setting) -> bool:
    """Route ``module``'s agent construction through :class:`TunedBindings`.
    True when patched now; False when already patched or not NIXL's layout."""
    bindings = getattr(module, "nixlBind", None)
    if isinstance(bindings, TunedBindings):
        return False
    if bindings is None or not hasattr(bindings, "nixlAgent"):
        logger.warning(
            "tandem: %s has no nixlBind.nixlAgent (another NIXL version?); "
            "its progress thread is left as NIXL sets it",
            module.__name__,
        )
        return False
    module.nixlBind = TunedBindings(bindings, setting)  # type: ignore[attr-defined]
    return True


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, setting: Setting) -> None:
        self._loader = loader
        self._setting = setting

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        patch_api_module(module, self._setting)


class ApiImportHook(importlib.abc.MetaPathFinder):
    """Patches NIXL's ``_api`` module right after it is executed."""

    def __init__(self, setting: Setting, names: frozenset[str] = BACKEND_API_MODULES) -> None:
        self.setting = setting
        self.names = names

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, ApiImportHook):
                continue
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                None if find is None else find(fullname, path, target)
            )
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self.setting)
                return spec
        return None


def install(setting: Setting) -> bool:
    """Patch the NIXL ``_api`` modules already imported and hook the import of the
    others. False (and nothing done) for ``busy``, or when already installed."""
    if setting.mode == "busy":
        return False
    if any(isinstance(finder, ApiImportHook) for finder in sys.meta_path):
        return False
    for name in ("nixl._api", *sorted(BACKEND_API_MODULES)):
        module = sys.modules.get(name)
        if module is not None:
            patch_api_module(module, setting)
    sys.meta_path.insert(0, ApiImportHook(setting))
    return True


def uninstall() -> None:
    """Remove the import hook (patched modules stay patched); for tests."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ApiImportHook)]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it once per process."""
    setting = setting_from_env()
    if setting.mode == "busy":
        logger.info("tandem: %s=busy: NIXL's busy-polling progress thread kept", ENV)
        return
    if importlib.util.find_spec("nixl") is None:
        return  # no NIXL here: nothing to tune
    if install(setting):
        logger.debug("tandem: NIXL agents will get %s", setting.describe())
