"""The OmniDeployment resource: its group, version and names, the rules on its name, and the
base of every model of its spec and status."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

GROUP = "omni.qwen.ai"


VERSION = "v1alpha1"


API_VERSION = f"{GROUP}/{VERSION}"


KIND = "OmniDeployment"


PLURAL = "omnideployments"


SINGULAR = "omnideployment"


SHORT_NAMES = ["omni"]


# Children are named "<name>-thinker-headless", "<name>-thinker-<replica>-<ordinal>";
# StatefulSet pod names end up in 63-character labels, so the name stays short.
MAX_NAME_LENGTH = 40


def _cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    """One x-kubernetes-validations entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


class ApiModel(BaseModel):
    """Base: camelCase on the wire, unknown fields refused, enums as strings."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the Kubernetes API (camelCase, no Nones)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def patch(self) -> dict[str, Any]:
        """Only the fields that were set (a merge patch leaves the others as they are)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035: Service names derive from it


def check_name(name: str) -> None:
    """The rules the CRD enforces on metadata.name, for offline rendering."""
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"metadata.name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"metadata.name {name!r} must be a DNS-1035 label (lower case letters, digits, '-', "
                         "starting with a letter)")
