"""tandem.autoscaling: sizing each role of a pool from its signals.

Split by job, from the pure core out (import the modules):

* :mod:`.capacity` — capacity models on plain numbers (Erlang C, the KV/TPOT line);
* :mod:`.planner` — ``decide(spec, inputs, state, now) -> Plan``: pure, no I/O, no clock;
* :mod:`.signals` — metric names, the queue semantics, histogram maths: one function
  from a role's :class:`~.signals.Snapshot` to the planner's inputs;
* sources, thin adapters that only fetch a snapshot: :mod:`.prometheus` (a cluster
  with Prometheus) and :mod:`.scrape` (workers' ``/metrics`` read directly: local mode).

The Kubernetes writer (replicas, status, Events) is the operator's
:mod:`tandem.operator.autoscaler`; the replay simulator is :mod:`tandem.replay`.
The planner, its signals and their PromQL are described in ``AUTOSCALING.md``.
"""
