"""The NIXL progress-thread plugin, on stand-ins for NIXL's bindings (no NIXL, no vLLM)."""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tandem.workers import nixl_tuning
from tandem.workers.nixl_tuning import ENV, Setting

ROOT = Path(__file__).resolve().parents[2]

# NIXL's own shape (nixl_cu13/_api.py): the agent builds the C++ config itself,
# hard-codes the delay, then hands it to the bindings' constructor.
FAKE_API = textwrap.dedent(
    """
    from . import _bindings as nixlBind

    class nixl_agent_config:
        def __init__(self, enable_prog_thread=True, num_threads=0):
            self.enable_pthread = enable_prog_thread
            self.num_threads = num_threads

    class nixl_agent:
        def __init__(self, agent_name, nixl_conf=None):
            nixl_conf = nixl_conf or nixl_agent_config()
            agent_config = nixlBind.nixlAgentConfig()
            agent_config.useProgThread = nixl_conf.enable_pthread
            agent_config.pthrDelay = 0
            self.agent = nixlBind.nixlAgent(agent_name, agent_config)
            self.constant = nixlBind.DRAM_SEG
    """
)
FAKE_BINDINGS = textwrap.dedent(
    """
    DRAM_SEG = 7
    created = []

    class nixlAgentConfig:
        def __init__(self):
            self.useProgThread = True
            self.pthrDelay = 0

    def nixlAgent(name, config):
        created.append((name, config.useProgThread, config.pthrDelay))
        return ("agent", name)
    """
)


@pytest.fixture
def fake_nixl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``tandem_fake_nixl`` shaped like a NIXL wheel; its name."""
    package = tmp_path / "tandem_fake_nixl"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_api.py").write_text(FAKE_API)
    (package / "_bindings.py").write_text(FAKE_BINDINGS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(nixl_tuning, "_logged", False)
    yield "tandem_fake_nixl"
    nixl_tuning.uninstall()
    for name in [n for n in sys.modules if n.startswith("tandem_fake_nixl")]:
        del sys.modules[name]


def _import_api(package: str) -> ModuleType:
    return importlib.import_module(f"{package}._api")


def _created(package: str) -> list[tuple[str, bool, int]]:
    created: list[tuple[str, bool, int]] = importlib.import_module(f"{package}._bindings").created
    return created


# -- the setting -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Setting("poll", 1000)),
        ("", Setting("poll", 1000)),
        ("poll", Setting("poll", 1000)),
        ("2500", Setting("poll", 2500)),
        (" OFF ", Setting("off")),
        ("busy", Setting("busy")),
        ("0", Setting("poll", 1000)),
        ("-5", Setting("poll", 1000)),
        ("sometimes", Setting("poll", 1000)),
    ],
)
def test_setting_from_env(value: str | None, expected: Setting) -> None:
    env = {} if value is None else {ENV: value}
    assert nixl_tuning.setting_from_env(env) == expected


def test_default_delay_is_at_least_a_millisecond() -> None:
    # Upstream NIXL's intended floor; the UCX backend rounds up to whole ms anyway.
    assert nixl_tuning.DEFAULT_DELAY_US >= 1000


def test_tune_config() -> None:
    config = SimpleNamespace(useProgThread=True, pthrDelay=0)
    nixl_tuning.tune_config(config, Setting("poll", 1000))
    assert (config.useProgThread, config.pthrDelay) == (True, 1000)

    longer = SimpleNamespace(useProgThread=True, pthrDelay=50_000)
    nixl_tuning.tune_config(longer, Setting("poll", 1000))
    assert longer.pthrDelay == 50_000  # never shortens a delay someone chose

    off = SimpleNamespace(useProgThread=True, pthrDelay=0)
    nixl_tuning.tune_config(off, Setting("off"))
    assert off.useProgThread is False

    busy = SimpleNamespace(useProgThread=True, pthrDelay=0)
    nixl_tuning.tune_config(busy, Setting("busy"))
    assert (busy.useProgThread, busy.pthrDelay) == (True, 0)


# -- patching NIXL's _api ------------------------------------------------------------


def test_hook_patches_the_api_when_it_is_imported(fake_nixl: str) -> None:
    hook = nixl_tuning.ApiImportHook(Setting("poll", 1000), frozenset({f"{fake_nixl}._api"}))
    sys.meta_path.insert(0, hook)
    api = _import_api(fake_nixl)
    assert isinstance(api.nixlBind, nixl_tuning.TunedBindings)

    agent = api.nixl_agent("a", api.nixl_agent_config(num_threads=4))
    assert agent.agent == ("agent", "a")
    assert agent.constant == 7  # everything else of the bindings passes through
    assert _created(fake_nixl) == [("a", True, 1000)]


def test_off_starts_no_progress_thread(fake_nixl: str) -> None:
    sys.meta_path.insert(
        0, nixl_tuning.ApiImportHook(Setting("off"), frozenset({f"{fake_nixl}._api"}))
    )
    _import_api(fake_nixl).nixl_agent("b")
    assert _created(fake_nixl) == [("b", False, 0)]


def test_an_api_imported_before_is_patched_at_once(fake_nixl: str) -> None:
    api = _import_api(fake_nixl)
    assert nixl_tuning.patch_api_module(api, Setting("poll", 3000))
    assert not nixl_tuning.patch_api_module(api, Setting("poll", 3000))  # idempotent
    api.nixl_agent("c")
    assert _created(fake_nixl) == [("c", True, 3000)]


def test_install_patches_modules_already_imported(
    fake_nixl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _import_api(fake_nixl)
    monkeypatch.setitem(sys.modules, "nixl_cu13._api", api)
    assert nixl_tuning.install(Setting("poll", 1000))
    assert not nixl_tuning.install(Setting("poll", 1000))  # once per process
    assert sum(isinstance(f, nixl_tuning.ApiImportHook) for f in sys.meta_path) == 1
    api.nixl_agent("d")
    assert _created(fake_nixl) == [("d", True, 1000)]


def test_busy_leaves_nixl_alone(fake_nixl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    api = _import_api(fake_nixl)
    monkeypatch.setitem(sys.modules, "nixl_cu13._api", api)
    assert not nixl_tuning.install(Setting("busy"))
    assert not any(isinstance(f, nixl_tuning.ApiImportHook) for f in sys.meta_path)
    api.nixl_agent("e")
    assert _created(fake_nixl) == [("e", True, 0)]


def test_register_honours_the_switch(fake_nixl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Setting] = []
    monkeypatch.setattr(nixl_tuning, "install", lambda setting: calls.append(setting) or True)
    monkeypatch.setattr(nixl_tuning.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv(ENV, "busy")
    nixl_tuning.register()
    assert calls == []
    monkeypatch.setenv(ENV, "2000")
    nixl_tuning.register()
    assert calls == [Setting("poll", 2000)]


def test_register_is_a_no_op_without_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Setting] = []
    monkeypatch.setattr(nixl_tuning, "install", lambda setting: calls.append(setting) or True)
    monkeypatch.setattr(nixl_tuning.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(ENV, raising=False)
    nixl_tuning.register()
    assert calls == []


def test_an_unknown_layout_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    module = ModuleType("nixl_cu99._api")
    with caplog.at_level(logging.WARNING):
        assert not nixl_tuning.patch_api_module(module, Setting("poll"))
    assert not hasattr(module, "nixlBind")


def test_logs_once_per_process(fake_nixl: str) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    nixl_tuning.logger.addHandler(handler)
    level = nixl_tuning.logger.level
    nixl_tuning.logger.setLevel(logging.INFO)
    try:
        api = _import_api(fake_nixl)
        nixl_tuning.patch_api_module(api, Setting("poll", 1000))
        api.nixl_agent("f")
        api.nixl_agent("g")
    finally:
        nixl_tuning.logger.removeHandler(handler)
        nixl_tuning.logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1, messages
    assert "1000 us" in messages[0]
    assert f"{ENV}=busy" in messages[0]


# -- the entry point ---------------------------------------------------------------


def test_entry_point_is_declared() -> None:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    target = plugins["tandem_nixl_tuning"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is nixl_tuning.register
