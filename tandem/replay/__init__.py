"""tandem.replay: the autoscaling strategies replayed on simulated traffic in virtual time.

Not part of the operator's runtime: ``benchmarks/replay.py`` drives it. The planner
sees exactly what the operator's planner sees: the simulated workers are read into a
:class:`tandem.autoscaling.signals.Snapshot` and made inputs by the same function.
"""
