"""tandem.replay: the autoscaling strategies replayed on simulated traffic in virtual time.

Not part of the operator's runtime: ``benchmarks/replay.py`` drives it. The planner
sees what the operator's planner sees: the simulated workers are read into a
:class:`tandem.autoscaling.signals.Snapshot` and made inputs by the same function.

The public surface, from the private layers (as kopf does it):

* :mod:`.workloads` — seeded traces: ``steady``, ``bursty``, ``diurnal``, ``shifting``;
* :mod:`.engine` — ``EngineModel``: the emulator's roofline as step costs;
* :mod:`.settings` — ``ReplayConfig``: provisioning delay, window, warm-up, SLOs;
* :mod:`.strategies` — ``Static``, ``Colocated``, ``Hpa``, ``Tandem``, ``Scheduled``
  behind the ``Strategy`` / ``Controller`` protocol (``start``, ``tick``);
* :mod:`.simulation` — ``replay(workload, strategy, config) -> Result``;
* :mod:`.results` — ``Result`` (attainment, goodput, GPU-seconds), ``oscillations``.
"""

from tandem.replay.engine import EngineModel
from tandem.replay.results import Decision, RequestOutcome, Result, TimelinePoint, oscillations
from tandem.replay.settings import ReplayConfig
from tandem.replay.simulation import replay
from tandem.replay.strategies import Colocated, Hpa, Scheduled, Static, Strategy, Tandem
from tandem.replay.workloads import (
    MAX_MODEL_LEN,
    Request,
    Workload,
    bursty,
    diurnal,
    shifting,
    steady,
)

__all__ = [
    "MAX_MODEL_LEN",
    "Colocated",
    "Decision",
    "EngineModel",
    "Hpa",
    "ReplayConfig",
    "Request",
    "RequestOutcome",
    "Result",
    "Scheduled",
    "Static",
    "Strategy",
    "Tandem",
    "TimelinePoint",
    "Workload",
    "bursty",
    "diurnal",
    "oscillations",
    "replay",
    "shifting",
    "steady",
]
