"""An engine emulator: speaks what vLLM's OpenAI server speaks, spends time like a GPU.

Modules, from the pure core out:

* :mod:`.timing` — the roofline: what a step costs on a named GPU for a model shape;
* :mod:`.scheduling` — vLLM v1's continuous batching and KV block pool, on given times;
* :mod:`.simulation` — a discrete-event replay of a workload through the scheduler;
* :mod:`.engine` — the scheduler driven on asyncio with an injectable clock;
* :mod:`.metrics` — the ``vllm:`` Prometheus families (``METRIC_NAMES``);
* :mod:`.protocol` — the OpenAI request/response shapes, token estimates;
* :mod:`.server` — the Starlette app, ``serving()`` / ``in_process()``;
* :mod:`.cli` — ``python -m tandem.workers.emulator``.
"""
