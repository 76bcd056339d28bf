"""The node side of DynamICCL, in four wings:

* `hook`: what runs inside training (times every collective, hands windows to the agent);
* `daemon`: the node agent (local API, aggregation, spool, sender, registration,
  recommendation cache, NCCL Inspector reader, fabric detection, metrics);
* `plugin`: DynamICCL's NCCL tuner plugin (C source, its rules, online rounds, reports);
* `launch`: `dynamiccl launch` and `dynamiccl doctor`.
"""
