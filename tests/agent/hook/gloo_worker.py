"""One gloo rank for test_gloo.py (run as a script: spawned tests cannot import test modules).

argv: rank world_size master_port agent_url dead_agent_url. Prints one JSON line of findings.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dynamiccl.agent import hook
from dynamiccl.workloads.topology import destroy_groups


def main() -> None:
    rank, world, port, agent_url, dead_url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    found: dict[str, object] = {}
    isend, irecv = dist.isend, dist.irecv
    profiler = hook.install(agent_url=agent_url, job_id="job-gloo", window_s=0.2)
    found["isend_identity"] = dist.isend is c10d.isend is isend and dist.irecv is c10d.irecv is irecv
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.ones(1024)  # 4096 bytes
    dist.all_reduce(x)
    dist.all_reduce(x, async_op=True).wait()
    dist.all_gather_into_tensor(torch.empty(1024 * world), x)
    dist.all_gather([torch.empty(1024) for _ in range(world)], x)
    dist.reduce_scatter_tensor(torch.empty(1024 // world), x)
    dist.broadcast(x, 0)
    dist.broadcast(x, src=0, async_op=True).get_future().wait()
    dist.reduce(x, 0)
    dist.all_to_all_single(torch.empty(1024), x)
    peer = (rank + 1) % world
    src = (rank - 1) % world
    if rank % 2 == 0:
        dist.send(x, peer)
        dist.recv(x, src)
    else:
        dist.recv(x, src)
        dist.send(x, peer)
    received = torch.zeros(1024)
    ops = [dist.P2POp(dist.isend, torch.full((1024,), float(rank + 1)), peer), dist.P2POp(dist.irecv, received, src)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    found["p2p_value"] = float(received[0])
    solo = [dist.new_group([r]) for r in range(world)][rank]
    dist.all_reduce(torch.ones(256), group=solo)  # 1024 bytes on a 1-rank group
    spare = dist.new_group(list(range(world)))
    dist.all_reduce(torch.ones(4), group=spare)  # the hook describes the group, then it is destroyed
    spare_ref = weakref.ref(spare)
    dist.destroy_process_group(spare)
    del spare
    gc.collect()
    found["destroyed_group_released"] = spare_ref() is None
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))  # one 16640-byte bucket
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
    found["grad_finite"] = bool(torch.isfinite(model.module.weight.grad).all())
    profiler.flush()
    found["stats"] = profiler.stats()
    hook.uninstall()
    found["restored"] = not hasattr(dist.all_reduce, "__dynamiccl_original__") and dist.isend is isend

    # The agent is down: nothing raises, measurements wait in the backlog; sample_every=2 halves the count.
    down = hook.install(agent_url=dead_url, job_id="job-down", sample_every=2, window_s=0.05)
    for _ in range(10):
        dist.all_reduce(x)
    down.flush(timeout_s=1.0)
    found["down_stats"] = down.stats()
    found["down_backlog"] = [m["count"] for m in down.poster._backlog]
    hook.uninstall(flush=False)
    destroy_groups()
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
