"""``tandem router`` command line, the uvicorn server, the tokenizer loader."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tandem.router import cli, server, settings, tokens


def test_bad_or_missing_config_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "router.json"
    bad.write_text(json.dumps({"servedModelName": "m"}))
    assert cli.main(["--config", str(bad)]) == 1
    assert "invalid router settings" in capsys.readouterr().err
    bad.write_text("{not json")
    assert cli.main(["--config", str(bad)]) == 1


def test_build_prefers_uvloop_and_httptools() -> None:
    config = settings.static_settings("m", decode=["http://127.0.0.1:1"])
    uv = server.build(config, host="127.0.0.1", port=1234)
    assert uv.config.port == 1234
    assert uv.config.lifespan == "on"
    assert server.app_of(uv).config is config


async def test_serving_in_process_and_set_endpoints() -> None:
    config = settings.static_settings("m", decode=["http://127.0.0.1:1"], scrape={"enabled": False})
    async with server.serving(config) as (url, app), httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/ready")).status_code == 200
        app.set_endpoints("decode", [])
        assert (await client.get(f"{url}/ready")).status_code == 503


def test_tokenizer_counter_counts_with_the_models_tokenizer(tmp_path: Path) -> None:
    tk = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    model = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    model.save(str(tmp_path / "tokenizer.json"))
    counter = tokens.load(str(tmp_path))  # a directory holding tokenizer.json
    assert counter.exact
    assert counter.count("hello world hello") == 3
    (tmp_path / "broken.json").write_text("{}")
    assert not tokens.load(str(tmp_path / "broken.json")).exact
