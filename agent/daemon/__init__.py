"""The node agent (`dynamiccl agent`): `agent` wires the parts; `app` is the local API the node's
jobs use; measurements go through `aggregator` (windows), `spool` (durable queue) and `sender`
(to the server); `registrar` registers the fabric (`fabric_detect`), `recommender` answers jobs
from the server or `reco_cache`; `inspector` reads NCCL Inspector's dumps; `workload` keeps what
each job runs; `metrics` is its Prometheus registry."""
