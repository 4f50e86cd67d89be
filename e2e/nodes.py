"""The fake node pools kwok plays: GPU capacity, GPU feature-discovery labels, taints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

POOL_LABEL = "omni.qwen.ai/pool"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU, as GPU feature discovery reports it
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_TAINT: Mapping[str, str] = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# kwok manages only nodes with this label; other nodes (if a test adds any) are left alone.
KWOK_NODE_LABEL = ("type", "kwok")
# kwok hands every pod an address from this loopback range (all of 127/8 is local on Linux).
POD_CIDR = "127.0.64.0/18"
NODE_IP = "127.0.0.1"


@dataclass(frozen=True)
class NodePool:
    """A group of identical fake nodes."""

    name: str
    nodes: tuple[str, ...]
    cpu: str
    memory: str
    gpus_per_node: int = 0
    gpu_product: str | None = None
    gpu_memory_mib: int | None = None
    pods: int = 110
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_gpus(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def labels(self) -> dict[str, str]:
        labels = {POOL_LABEL: self.name, KWOK_NODE_LABEL[0]: KWOK_NODE_LABEL[1]}
        if self.has_gpus:
            labels.update(
                {
                    GPU_PRODUCT_LABEL: str(self.gpu_product),
                    GPU_MEMORY_LABEL: str(self.gpu_memory_mib),
                    GPU_COUNT_LABEL: str(self.gpus_per_node),
                    "nvidia.com/gpu.present": "true",
                }
            )
        labels.update(self.extra_labels)
        return labels

    @property
    def taints(self) -> list[dict[str, str]]:
        return [dict(GPU_TAINT)] if self.has_gpus else []

    @property
    def capacity(self) -> dict[str, str]:
        cap = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "1Ti",
        }
        if self.has_gpus:
            cap[GPU_RESOURCE] = str(self.gpus_per_node)
        return cap

    @property
    def node_selector(self) -> dict[str, str]:
        """What a workload puts in ``spec.nodeSelector`` to land on this pool."""
        return {POOL_LABEL: self.name}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        """What a workload needs in ``spec.tolerations`` to land on this pool."""
        return [{"key": t["key"], "operator": "Exists", "effect": t["effect"]} for t in self.taints]

    def node_manifest(self, node: str) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "labels": labels,
                "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
            },
            "spec": {"taints": self.taints},
            "status": {"capacity": self.capacity, "allocatable": self.capacity},
        }


NODE_POOLS: tuple[NodePool, ...] = (
    NodePool(
        name="thinker",
        nodes=("thinker-gpu-0", "thinker-gpu-1"),
        cpu="96",
        memory="1Ti",
        gpus_per_node=8,
        gpu_product="NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib=81559,
    ),
    NodePool(
        name="talker",
        nodes=("talker-gpu-0", "talker-gpu-1"),
        cpu="48",
        memory="192Gi",
        gpus_per_node=4,
        gpu_product="NVIDIA-L4",
        gpu_memory_mib=23034,
    ),
    NodePool(name="cpu", nodes=("cpu-0", "cpu-1"), cpu="32", memory="128Gi"),
)
POOLS: dict[str, NodePool] = {p.name: p for p in NODE_POOLS}


def node_manifests(pools: Iterable[NodePool] = NODE_POOLS) -> list[dict[str, Any]]:
    return [pool.node_manifest(n) for pool in pools for n in pool.nodes]
