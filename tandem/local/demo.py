"""Local mode's demo: one streamed chat completion through the router, and what the
decode workers' metrics say about the KV that reached them over NIXL."""

from __future__ import annotations

import contextlib
import json
import sys

import httpx

from tandem import vllm_metrics
from tandem.autoscaling import scrape
from tandem.local import planning, processes

__all__ = ["DEMO_PROMPT", "demo", "kv_evidence"]

DEMO_PROMPT = (
    "Explain in one paragraph why prefill is compute-bound while decode is bound by "
    "memory bandwidth, and what splitting them across two pools buys."
)


async def demo(url: str, served_name: str, out: object = None, max_tokens: int = 24) -> str:
    """Stream one chat completion through the router, echoing it as it arrives."""
    write = sys.stdout.write if out is None else out.write  # type: ignore[attr-defined]
    body = {
        "model": served_name,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text = []
    async with (
        httpx.AsyncClient(timeout=120.0) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as response,
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
                write(piece)
    write("\n")
    return "".join(text)


async def kv_evidence(pool: processes.LocalPool) -> str:
    """What the decode workers' metrics say about KV that came over NIXL."""
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
    return f"decode workers: {external:g} prompt tokens arrived as KV from prefill, {nixl_bytes:g} bytes over NIXL"
