"""Local mode's demo: one streamed chat completion through the router, and what the
decode workers' metrics say about the KV that reached them over NIXL."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable

import httpx

from tandem import vllm_metrics
from tandem.autoscaling import scrape
from tandem.local import planning, processes

__all__ = ["DEMO_PROMPT", "demo", "kv_evidence", "printable", "reference", "verdict"]

DEMO_PROMPT = (
    "Explain in one paragraph why prefill is compute-bound while decode is bound by "
    "memory bandwidth, and what splitting them across two pools buys."
)


def printable(text: str) -> str:
    """``text`` as a terminal shows it safely: what is not printable (control
    characters, and U+FFFD, which stands for bytes that were not valid UTF-8: a
    random-weight model emits token pieces that split characters) becomes ``·``."""
    return "".join(c if (c.isprintable() or c == " ") and c != "\ufffd" else "·" for c in text)


def _body(served_name: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": served_name,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def demo(
    url: str, served_name: str, out: Callable[[str], object] | None = None, max_tokens: int = 24
) -> str:
    """Stream one greedy chat completion through the router, echoing it (made
    :func:`printable`) as it arrives; the text as the server sent it."""
    write = out or sys.stdout.write
    text = []
    async with (
        httpx.AsyncClient(timeout=120.0) as client,
        client.stream(
            "POST", url + "/v1/chat/completions", json=_body(served_name, max_tokens, True)
        ) as response,
    ):
        if response.status_code != 200:
            raise planning.LocalModeError(
                f"demo request failed: {response.status_code} {await response.aread()!r}"
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise planning.LocalModeError(f"demo stream ended with an error: {event['error']}")
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text.append(piece)
                write(printable(piece))
    write("\n")
    return "".join(text)


async def reference(worker_url: str, served_name: str, max_tokens: int = 24) -> str:
    """The same greedy request answered by one worker alone (its own prefill, no KV
    hand-over): what the disaggregated answer must equal."""
    async with httpx.AsyncClient(timeout=120.0) as client:
        response = await client.post(
            worker_url + "/v1/chat/completions", json=_body(served_name, max_tokens, False)
        )
    if response.status_code != 200:
        raise planning.LocalModeError(
            f"reference request failed: {response.status_code} {response.text[:300]}"
        )
    content: str = response.json()["choices"][0]["message"]["content"] or ""
    return content


def verdict(disaggregated: str, single: str) -> str:
    """The match line; :class:`~.planning.LocalModeError` when they differ."""
    if disaggregated != single:
        raise planning.LocalModeError(
            "the disaggregated answer differs from a single worker's greedy answer to the "
            f"same request:\n  through the router: {printable(disaggregated)!r}\n"
            f"  one worker alone:   {printable(single)!r}"
        )
    return (
        "match: the disaggregated answer (prefill on one worker, KV over NIXL, decode on "
        "another) equals one worker's own greedy answer to the same request"
    )


async def kv_evidence(pool: processes.LocalPool, emulated: bool = False) -> str:
    """What the decode workers' metrics say about KV that came over NIXL (the
    emulator's figures are its own invention: labelled so)."""
    external = nixl_bytes = 0.0
    async with httpx.AsyncClient(timeout=5.0) as client:
        for worker in pool.workers["decode"]:
            with contextlib.suppress(httpx.HTTPError):
                samples = scrape.parse((await client.get(worker.url + "/metrics")).text)
                external += sum(
                    v
                    for labels, v in samples.get(
                        f"{vllm_metrics.PROMPT_TOKENS_BY_SOURCE}_total", []
                    )
                    if labels.get("source") == "external_kv_transfer"
                )
                nixl_bytes += sum(
                    v for _, v in samples.get(f"{vllm_metrics.NIXL_BYTES_TRANSFERRED}_sum", [])
                )
    label = " (emulated: no KV moved)" if emulated else ""
    return (
        f"decode workers: {external:g} prompt tokens arrived as KV from prefill, "
        f"{nixl_bytes:g} bytes over NIXL{label}"
    )
