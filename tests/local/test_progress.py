"""Start-up progress: phases read from a worker's log, shown per worker."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tandem.local import demo, planning, progress
from tandem.workers import phases

P = phases.Phase

VLLM_START = [
    "INFO 11-30 08:00:01 [api_utils.py:286] non-default args: {'model': '/m'}",
    "INFO 11-30 08:00:03 [core.py:134] Initializing a V1 LLM engine (v0.32.0) with config: ...",
    "INFO 11-30 08:00:04 [gpu_model_runner.py:5040] Starting to load model /m...",
    "INFO 11-30 08:00:05 [default_loader.py:501] Loading weights took 0.01 seconds",
    "INFO 11-30 08:00:06 [model_runner.py:13] Warming up model for the compilation...",
    "INFO 11-30 08:00:09 [core.py:403] init engine (profile, create kv cache, warmup model) took 4.1 s",
    "INFO 11-30 08:00:10 [entry.py:140] Starting vLLM server on http://127.0.0.1:8000",
]  # fmt: skip


@pytest.mark.parametrize(
    ("upto", "phase"),
    [(0, P.IMPORTING), (1, P.STARTING_ENGINE), (2, P.STARTING_WORKER), (3, P.LOADING_MODEL),
     (4, P.ALLOCATING_KV),
     (5, P.WARMING_UP), (7, P.STARTING_SERVER)],
)  # fmt: skip
def test_the_phase_follows_vllms_own_log(upto: int, phase: phases.Phase) -> None:
    assert phases.phase_of(VLLM_START[:upto]) is phase


def test_the_phase_never_goes_back() -> None:
    assert phases.phase_of(VLLM_START[:2], since=P.WARMING_UP) is P.WARMING_UP


@dataclass
class FakeWorker:
    name: str
    pid: int | None
    steps: list[phases.Phase]
    elapsed: float = 0.0

    @property
    def phase(self) -> phases.Phase:
        return self.steps[0]

    def refresh_phase(self) -> phases.Phase:
        if len(self.steps) > 1:
            self.steps.pop(0)
        self.elapsed += 5.0
        return self.steps[0]


def test_a_pipe_gets_one_line_per_phase_change_and_no_control_characters() -> None:
    out: list[str] = []
    shown = progress.Progress(out.append, tty=False)
    w = FakeWorker("prefill-0", 42, [P.IMPORTING, P.IMPORTING, P.LOADING_MODEL, P.READY])
    for _ in range(4):
        shown.update([w])
    assert [x.split()[3] for x in out] == ["importing", "loading", "ready"]
    assert "pid 42" in out[0]
    shown.finish([w])
    assert (
        out[-1].strip().startswith("prefill-0 started in 15s: importing 10s · loading the model 5s")
    )
    assert not any("\x1b" in x for x in out)


def test_a_terminal_gets_the_lines_redrawn_in_place() -> None:
    out: list[str] = []
    shown = progress.Progress(out.append, tty=True)
    workers = [FakeWorker("prefill-0", 1, [P.IMPORTING]), FakeWorker("decode-0", 2, [P.READY])]
    shown.update(workers)
    shown.update(workers)
    assert out[0].count("\n") == 1
    assert not out[0].startswith("\x1b[")
    assert out[1].startswith("\x1b[2F")  # back up over the two lines drawn before


def test_demo_text_is_printable_and_the_match_is_checked() -> None:
    assert demo.printable("ab\ufffdc\x07d") == "ab·c·d"
    assert demo.verdict("same", "same").startswith("match:")
    with pytest.raises(planning.LocalModeError, match="differs"):
        demo.verdict("one", "two")
