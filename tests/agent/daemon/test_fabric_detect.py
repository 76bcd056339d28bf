"""Fabric detection on fake sysfs/proc trees and fake nvidia-smi output."""

from __future__ import annotations

from pathlib import Path

from dynamiccl.agent.daemon.fabric_detect import (
    FabricOverrides,
    TorchInfo,
    default_fabric_id,
    detect_fabric,
    normalize_gpu_name,
)

H100_TOPO = "\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tCPU Affinity\n" + "".join(
    f"GPU{i}\t" + "\t".join("X" if j == i else "NV18" for j in range(8)) + "\tPIX\t0-55\n" for i in range(8)
)
PCIE_TOPO = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tSYS\t0-15\nGPU1\tSYS\t X \t0-15\n"


def runner(outputs: dict[str, str]):
    def run(argv):
        return outputs.get(" ".join(argv[1:]))
    return run


def ib_port(root: Path, dev: str, port: int, layer: str, rate: str, state: str = "4: ACTIVE") -> None:
    d = root / "sys/class/infiniband" / dev / "ports" / str(port)
    d.mkdir(parents=True)
    (d / "link_layer").write_text(layer + "\n")
    (d / "rate").write_text(rate + "\n")
    (d / "state").write_text(state + "\n")


def no_torch():
    return None


def test_h100_nvswitch_ndr(tmp_path):
    for i in range(8):
        ib_port(tmp_path, f"mlx5_{i}", 1, "InfiniBand", "400 Gb/sec (4X NDR)")
    ib_port(tmp_path, "mlx5_8", 1, "Ethernet", "25 Gb/sec (1X EDR)")  # the management NIC
    ib_port(tmp_path, "mlx5_9", 1, "InfiniBand", "400 Gb/sec (4X NDR)", state="1: DOWN")
    run = runner({"--query-gpu=name --format=csv,noheader": "NVIDIA H100 80GB HBM3\n" * 8,
                  "topo -m": H100_TOPO})
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidia0").touch()
    detected = detect_fabric(root=tmp_path, run=run, torch_probe=lambda: TorchInfo(("H100",) * 8, "2.28.9"))
    f = detected.fabric
    assert not detected.cpu_only
    assert (f.gpu, f.gpus_per_node, f.intra_node, f.inter_node, f.nics_per_node, f.nccl_version) == (
        "H100-SXM", 8, "nvswitch", "ib-ndr400", 8, "2.28.9")
    assert default_fabric_id(f) == "h100-sxm-8x-nvswitch-ib-ndr400x8"


def test_pcie_roce_and_nvswitch_devices(tmp_path):
    ib_port(tmp_path, "mlx5_0", 1, "Ethernet", "200 Gb/sec (2X HDR)")
    ib_port(tmp_path, "mlx5_1", 1, "Ethernet", "200 Gb/sec (2X HDR)")
    run = runner({"--query-gpu=name --format=csv,noheader": "NVIDIA L40S\nNVIDIA L40S\n", "topo -m": PCIE_TOPO})
    f = detect_fabric(root=tmp_path, run=run, torch_probe=no_torch).fabric
    assert (f.gpu, f.gpus_per_node, f.intra_node, f.inter_node, f.nics_per_node) == ("L40S", 2, "pcie", "roce-200", 2)
    (tmp_path / "proc/driver/nvidia-nvswitch/devices").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia-nvswitch/devices/0000:05:00.0").touch()
    assert detect_fabric(root=tmp_path, run=run, torch_probe=no_torch).fabric.intra_node == "nvswitch"


def test_plain_ethernet_without_rdma(tmp_path):
    for name, speed in (("eth0", "100000"), ("eth1", "100000"), ("lo", "")):
        d = tmp_path / "sys/class/net" / name
        d.mkdir(parents=True)
        (d / "speed").write_text(speed)
        if name != "lo":
            (d / "device").mkdir()
    run = runner({"--query-gpu=name --format=csv,noheader": "NVIDIA A100-SXM4-80GB\n"})
    f = detect_fabric(root=tmp_path, run=run, torch_probe=no_torch).fabric
    assert (f.gpu, f.intra_node, f.inter_node, f.nics_per_node) == ("A100-SXM4-80GB", "pcie", "ethernet-100", 2)


def test_gpus_from_torch_when_nvidia_smi_is_missing(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidia0").touch()
    detected = detect_fabric(root=tmp_path, run=runner({}),
                             torch_probe=lambda: TorchInfo(("NVIDIA H200",) * 4, "2.27.3"))
    f = detected.fabric
    assert (f.gpu, f.gpus_per_node, f.nccl_version) == ("H200", 4, "2.27.3")
    assert any("torch" in note for note in detected.notes)


def test_cpu_machine_is_marked_and_overrides_apply(tmp_path):
    called: list[None] = []
    detected = detect_fabric(root=tmp_path, run=runner({}), torch_probe=lambda: called.append(None))
    assert detected.cpu_only and not called  # no GPU device nodes: torch is not even imported
    f = detected.fabric
    assert (f.gpu, f.intra_node, f.inter_node) == ("cpu", "pcie", "none")
    assert any("CPU fabric" in note for note in detected.notes)
    assert default_fabric_id(f) == "cpu-1x-pcie-none"
    over = FabricOverrides(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400",
                           nics_per_node=8, nccl_version="2.28.9", sharp=True)
    f = detect_fabric(over, root=tmp_path, run=runner({}), torch_probe=no_torch).fabric
    assert (f.gpu, f.gpus_per_node, f.intra_node, f.inter_node, f.nics_per_node, f.nccl_version, f.sharp) == (
        "H100-SXM", 8, "nvswitch", "ib-ndr400", 8, "2.28.9", True)


def test_gpu_names():
    assert normalize_gpu_name("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert normalize_gpu_name("NVIDIA H100 PCIe") == "H100-PCIe"
    assert normalize_gpu_name("Tesla V100-SXM2-32GB") == "V100-SXM2-32GB"
