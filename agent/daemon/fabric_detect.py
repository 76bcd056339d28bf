"""Detects the node's fabric (GPUs, intra-node links, RDMA NICs, NCCL version).

Sources, each optional: `nvidia-smi` (GPU names, `topo -m` link matrix),
torch (GPUs when nvidia-smi is missing, the NCCL version), `/proc/driver/nvidia-nvswitch`
and `/dev/nvidia-nvswitch*` (NVSwitch), `/sys/class/infiniband/*/ports/*`
(InfiniBand or RoCE ports, their rate) and `/sys/class/net/*/speed` (plain
Ethernet). Every field can be overridden. The filesystem root, the command
runner and the torch probe are parameters so tests run on fake trees.

A machine without a GPU gets a clearly marked CPU fabric (gpu "cpu",
intra_node "pcie", inter_node "none") and a note saying so.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamiccl.schemas import Fabric

Runner = Callable[[Sequence[str]], str | None]
"""Runs a command; its stdout, or None when the command is missing or fails."""


@dataclass(frozen=True)
class TorchInfo:
    gpu_names: tuple[str, ...]
    nccl_version: str | None


TorchProbe = Callable[[], TorchInfo | None]


@dataclass(frozen=True)
class FabricOverrides:
    gpu: str | None = None
    gpus_per_node: int | None = None
    intra_node: str | None = None
    inter_node: str | None = None
    nics_per_node: int | None = None
    nccl_version: str | None = None
    sharp: bool | None = None


@dataclass(frozen=True)
class DetectedFabric:
    fabric: Fabric
    cpu_only: bool
    notes: tuple[str, ...]


def run_command(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def probe_torch() -> TorchInfo | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return TorchInfo(names, torch_nccl_version())


def torch_nccl_version() -> str | None:
    """The NCCL torch links, as `2.28.9` (None: a torch without NCCL)."""
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def normalize_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100-SXM'; other names lose the vendor and use dashes."""
    name = re.sub(r"^(NVIDIA|Tesla)\s+", "", name.strip())
    if re.match(r"^H100 \d+GB HBM3$", name):
        return "H100-SXM"
    return re.sub(r"\s+", "-", name)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _nvlink_matrix(topo: str) -> list[list[bool]] | None:
    """Which GPU pairs `nvidia-smi topo -m` shows as NVLink-connected (NV<n>)."""
    lines = [line.split() for line in topo.splitlines() if line.strip()]
    header = next((cells for cells in lines if cells and re.fullmatch(r"GPU\d+", cells[0])), None)
    if header is None:
        return None
    n = sum(1 for cell in header if re.fullmatch(r"GPU\d+", cell))
    rows = [cells[1 : n + 1] for cells in lines if cells and re.fullmatch(r"GPU\d+", cells[0]) and cells is not header]
    rows = [cells for cells in rows if len(cells) == n]
    if len(rows) != n:
        return None
    return [[cell.startswith("NV") for cell in row] for row in rows]


def detect_intra_node(root: Path, run: Runner, gpus: int) -> tuple[str, str]:
    """(intra_node, how it was decided)."""
    nvswitch_dir = root / "proc/driver/nvidia-nvswitch/devices"
    if (nvswitch_dir.is_dir() and any(nvswitch_dir.iterdir())) or glob.glob(str(root / "dev/nvidia-nvswitch*")):
        return "nvswitch", "NVSwitch devices present"
    topo = run(["nvidia-smi", "topo", "-m"])
    matrix = _nvlink_matrix(topo) if topo else None
    if matrix is None:
        return "pcie", "no NVLink topology found; assuming PCIe"
    pairs = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
    if pairs and all(pairs) and len(matrix) >= 8:
        # Every pair of 8+ GPUs directly on NVLink is only built with NVSwitches.
        return "nvswitch", "all GPU pairs on NVLink"
    if any(pairs):
        return "nvlink", "NVLink between some GPUs"
    return "pcie", "GPUs connected over PCIe"


def _rate_gbps(text: str | None) -> float | None:
    match = re.match(r"\s*([\d.]+)", text or "")
    return float(match.group(1)) if match else None


def detect_rdma(root: Path) -> tuple[str, int] | None:
    """(inter_node, active ports) from /sys/class/infiniband, or None without RDMA NICs."""
    ports: list[tuple[str, float]] = []
    for port in sorted((root / "sys/class/infiniband").glob("*/ports/*")):
        state = _read(port / "state")
        if state is not None and "ACTIVE" not in state.upper():
            continue
        layer, rate = _read(port / "link_layer"), _rate_gbps(_read(port / "rate"))
        if layer and rate:
            ports.append((layer.lower(), rate))
    if not ports:
        return None
    layer = Counter(layer for layer, _ in ports).most_common(1)[0][0]
    rate = max(r for l, r in ports if l == layer)
    count = sum(1 for l, _ in ports if l == layer)
    if layer == "infiniband":
        name = "ib-ndr400" if rate >= 400 else "ib-hdr200" if rate >= 200 else f"ib-{rate:g}"
    else:  # RDMA over Ethernet
        name = "roce-400" if rate >= 400 else "roce-200" if rate >= 200 else f"roce-{rate:g}"
    return name, count


def detect_ethernet(root: Path) -> tuple[str, int] | None:
    """The fastest physical Ethernet speed and how many ports have it, or None."""
    speeds: list[int] = []
    for dev in sorted((root / "sys/class/net").glob("*")):
        if not (dev / "device").exists():  # virtual interfaces (lo, veth, bridges) have no device
            continue
        speed = _read(dev / "speed")
        if speed and speed.lstrip("-").isdigit() and int(speed) > 0:
            speeds.append(int(speed))
    if not speeds:
        return None
    gbps = max(speeds) // 1000
    name = "ethernet-100" if gbps >= 100 else "ethernet-25" if gbps >= 25 else f"ethernet-{gbps}"
    return name, speeds.count(max(speeds))


def detect_fabric(
    overrides: FabricOverrides = FabricOverrides(),
    root: Path = Path("/"),
    run: Runner = run_command,
    torch_probe: TorchProbe = probe_torch,
) -> DetectedFabric:
    notes: list[str] = []
    smi = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    names = [line.strip() for line in (smi or "").splitlines() if line.strip()]
    # torch is slow to import and can only see GPUs whose device nodes exist: skip it otherwise.
    gpu_devices = glob.glob(str(root / "dev/nvidia[0-9]*"))
    torch_info = torch_probe() if names or gpu_devices else None
    if not names and torch_info is not None:
        names = list(torch_info.gpu_names)
        notes.append("GPUs from torch.cuda (nvidia-smi unavailable)")
    cpu_only = not names and overrides.gpu is None
    if cpu_only:
        notes.append("no NVIDIA GPU found: CPU fabric (gloo)")
        gpu, gpus, intra, inter, nics = "cpu", 1, "pcie", "none", 0
    else:
        gpu = normalize_gpu_name(Counter(names).most_common(1)[0][0]) if names else "unknown"
        gpus = max(len(names), 1)
        intra, why = detect_intra_node(root, run, gpus)
        notes.append(f"intra-node {intra}: {why}")
        network = detect_rdma(root) or detect_ethernet(root)
        inter, nics = network if network else ("none", 0)
        notes.append(f"inter-node {inter} x{nics}" if network else "no network NIC found")
    nccl = torch_info.nccl_version if torch_info else None
    fabric = Fabric(
        gpu=overrides.gpu or gpu,
        gpus_per_node=overrides.gpus_per_node or gpus,
        intra_node=overrides.intra_node or intra,
        inter_node=overrides.inter_node or inter,
        nics_per_node=overrides.nics_per_node if overrides.nics_per_node is not None else nics,
        nccl_version=overrides.nccl_version or nccl,
        sharp=bool(overrides.sharp),
    )
    return DetectedFabric(fabric, cpu_only, tuple(notes))


def default_fabric_id(fabric: Fabric) -> str:
    """A hostname-free id, so every node of one cluster shares it: 'h100-sxm-8x-nvswitch-ib-ndr400x8'."""
    parts = [fabric.gpu, f"{fabric.gpus_per_node}x", fabric.intra_node, fabric.inter_node]
    name = "-".join(parts)
    if fabric.inter_node != "none":
        name += f"x{fabric.nics_per_node}"
    if fabric.sharp:
        name += "-sharp"
    return re.sub(r"[^a-z0-9._:-]+", "-", name.lower()).strip("-")[:128] or "fabric"
