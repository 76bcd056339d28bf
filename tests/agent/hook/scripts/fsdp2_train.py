"""An ordinary FSDP2 script (nothing DynamICCL in it): two fully_shard units, 3 steps on gloo."""

import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
for layer in model:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
# gloo (torch 2.13) may abort at exit ("terminate called without an active exception") when a
# group is destroyed while its threads still finish the last collective: a pause avoids it
time.sleep(0.5)
dist.destroy_process_group()
