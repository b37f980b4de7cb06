"""build_vllm_args: one pure function for every place a worker starts."""

from __future__ import annotations

import json

from tandem.workers import vllm_args


def test_minimal_aggregated_worker() -> None:
    args = vllm_args.build_vllm_args(
        vllm_args.EngineArgs(model="/m", served_name="s"), "aggregated"
    )
    assert args == ["--model", "/m", "--served-model-name", "s", "--host", "0.0.0.0",
                    "--port", "8000", "--dtype", "auto", "--tensor-parallel-size", "1"]  # fmt: skip


def test_disaggregated_roles_use_nixl_kv_both() -> None:
    engine = vllm_args.EngineArgs(model="/m", served_name="s", kv_buffer_device="cpu")
    for role in ("prefill", "decode"):
        args = vllm_args.build_vllm_args(engine, role)
        config = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert config == {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
        }


def test_optional_flags_and_user_args_last() -> None:
    engine = vllm_args.EngineArgs(
        model="/m", served_name="s", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256,
        enforce_eager=True, gpu_memory_utilization=0.5, extra_args=("--seed", "7"),
    )  # fmt: skip
    args = vllm_args.build_vllm_args(engine, "decode")
    assert args[-2:] == ["--seed", "7"]
    for flag, value in [("--max-model-len", "512"), ("--max-num-seqs", "8"),
                        ("--max-num-batched-tokens", "256"), ("--gpu-memory-utilization", "0.5")]:  # fmt: skip
        assert args[args.index(flag) + 1] == value
    assert "--enforce-eager" in args


def test_command_runs_the_module_not_the_console_script() -> None:
    command = vllm_args.build_vllm_command(
        vllm_args.EngineArgs(model="/m", served_name="s"), "prefill", "py"
    )
    assert command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
