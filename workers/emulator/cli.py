"""Command line: ``python -m tandem.workers.emulator [flags]`` (``tandem emulate``).

Flags that vLLM also has keep vLLM's names (``--served-model-name``,
``--max-num-seqs``, ``--max-num-batched-tokens``, ``--max-model-len``,
``--block-size``, ``--gpu-memory-utilization``, ``--num-gpu-blocks-override``), so a
launcher can hand the emulator the arguments it builds for vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn

from tandem.workers.emulator import scheduling, server, timing

__all__ = ["Invocation", "main", "parse"]


@dataclass(frozen=True)
class Invocation:
    """What the command line asked for."""

    settings: server.EmulatorSettings
    host: str
    port: int
    log_level: str


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tandem.workers.emulator",
        description="Serve an emulated vLLM engine: vLLM's OpenAI API and metrics, GPU-like timing.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    p.add_argument(
        "--role",
        choices=["prefill", "decode", "aggregated"],
        default="aggregated",
        help="KV hand-over directions honoured: prefill takes do_remote_decode, decode takes "
        "do_remote_prefill (default: %(default)s)",
    )
    p.add_argument(
        "--model-name",
        "--served-model-name",
        dest="model_name",
        default=server.EmulatorSettings.model_name,
        help="served model name (default: %(default)s)",
    )
    p.add_argument("--gpu", choices=sorted(timing.GPUS), default="H100", help="GPU roofline preset")
    p.add_argument(
        "--model-shape",
        choices=sorted(timing.MODEL_SHAPES),
        default=timing.LLAMA_3_1_8B.name,
        help="model shape preset (default: %(default)s)",
    )
    p.add_argument("--mfu", type=float, help="override the GPU's prefill FLOPs utilization")
    p.add_argument("--mbu", type=float, help="override the GPU's decode bandwidth utilization")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--num-gpu-blocks-override", type=int, default=0, help="KV blocks (0: what fits the GPU)"
    )
    p.add_argument(
        "--kv-link-bandwidth",
        type=float,
        default=25.0,
        help="GB/s of the prefill->decode KV link (default: %(default)s)",
    )
    p.add_argument("--kv-link-latency", type=float, default=0.0, help="seconds per KV transfer")
    p.add_argument("--step-overhead", type=float, default=0.0, help="seconds added to each step")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="emulated seconds per wall second; >1 runs faster than a GPU (default: %(default)s)",
    )
    p.add_argument("--default-max-tokens", type=int, default=16)
    p.add_argument("--engine-id", help="remote_engine_id to report (default: a fresh UUID)")
    p.add_argument("--kv-host", default="127.0.0.1", help="remote_host to report")
    p.add_argument("--kv-port", type=int, default=5600, help="remote_port to report")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse(argv: Sequence[str] | None = None) -> Invocation:
    """Parse the command line into settings; raises SystemExit(2) on bad flags."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        gpu = timing.GPUS[args.gpu]
        overrides = {k: v for k, v in (("mfu", args.mfu), ("mbu", args.mbu)) if v is not None}
        gpu = dataclasses.replace(gpu, **overrides)
        config = scheduling.SchedulerConfig(
            gpu=gpu,
            shape=timing.MODEL_SHAPES[args.model_shape],
            num_gpu_blocks=args.num_gpu_blocks_override,
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_link_bandwidth=args.kv_link_bandwidth * 1e9,
            kv_link_latency=args.kv_link_latency,
            step_overhead=args.step_overhead,
        )
        config.total_blocks  # noqa: B018 - fails early if the model does not fit
        extra = {"engine_id": args.engine_id} if args.engine_id else {}
        settings = server.EmulatorSettings(
            model_name=args.model_name,
            role=args.role,
            scheduler=config,
            max_model_len=args.max_model_len,
            default_max_tokens=args.default_max_tokens,
            time_scale=args.time_scale,
            kv_host=args.kv_host,
            kv_port=args.kv_port,
            **extra,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return Invocation(settings=settings, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; returns the process exit code."""
    invocation = parse(argv)
    logging.basicConfig(
        level=invocation.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app = server.build_app(invocation.settings)
    config = uvicorn.Config(
        app,
        host=invocation.host,
        port=invocation.port,
        log_level=invocation.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
    return 0
