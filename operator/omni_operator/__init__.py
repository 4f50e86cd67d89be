"""Kubernetes operator for Qwen3-Omni: OmniDeployment -> sized GPU StatefulSets."""

__version__ = "0.1.0"
