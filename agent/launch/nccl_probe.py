"""One rank of real NCCL with DynamICCL's hook installed: what `dynamiccl doctor` runs on a GPU.

    python -m dynamiccl.agent.launch.nccl_probe

Run in a child process by the doctor, with NCCL_DEBUG=INFO, the tuner plugin
and a rules file in its environment, so that an NCCL abort cannot take the
doctor down and NCCL's log (on stderr) can be searched for the plugin's lines.
It initialises a one-rank NCCL process group on GPU 0, installs the hook,
runs a few all-reduces and prints one JSON line: the NCCL version and what
the hook's NCCL path (ProcessGroupNCCL's timing and completion hook) recorded.
"""

from __future__ import annotations

import json
import os
import socket
import time

CALLS = 8
NBYTES = 4 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    import torch
    import torch.distributed as dist

    from dynamiccl.agent import hook
    from dynamiccl.agent.daemon.fabric_detect import torch_nccl_version

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    profiler = hook.install(agent_url="http://127.0.0.1:9", job_id="dynamiccl-doctor", window_s=3600)
    tensor = torch.ones(NBYTES // 4, device=device)
    for _ in range(CALLS):
        dist.all_reduce(tensor)
    torch.cuda.synchronize()
    deadline = time.monotonic() + 5
    timed: dict = {}
    while time.monotonic() < deadline:  # completions arrive on ProcessGroupNCCL's hook thread
        for key, (count, seconds) in profiler.table.take().items():
            total = timed.setdefault(key.collective.value, [0, 0.0])
            total[0] += count
            total[1] += seconds
        if sum(count for count, _ in timed.values()) >= CALLS:
            break
        time.sleep(0.05)
    print(json.dumps({
        "nccl_version": torch_nccl_version(),
        "calls": CALLS,
        "timed": {name: {"count": count, "mean_us": seconds / count * 1e6 if count else 0.0}
                  for name, (count, seconds) in timed.items()},
        "hook": profiler.stats(),
    }), flush=True)
    hook.uninstall(flush=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
