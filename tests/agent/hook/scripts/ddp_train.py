"""An ordinary DDP script (nothing DynamICCL in it): 3 steps of a linear model on gloo."""

import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(64, 64))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
# gloo (torch 2.13) may abort at exit ("terminate called without an active exception") when a
# group is destroyed while its threads still finish the last collective: a pause avoids it
time.sleep(0.5)
dist.destroy_process_group()
