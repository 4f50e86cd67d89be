"""The OmniDeployment API: its spec and status models, the CRD generated from them, quantities."""
