"""Generate the OmniDeployment CRD from the pydantic models.

The pydantic JSON schema is turned into a Kubernetes *structural* schema:
references inlined, optional unions collapsed, JSON-Schema-2020 bounds rewritten
to OpenAPI v3.0 form, free-form objects marked to keep unknown fields, and
object-valued fields defaulted to their models' full defaults (the CEL rules
rely on those fields being present).
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from omni_operator.api.resource import (GROUP, KIND, MAX_NAME_LENGTH, NAME_PATTERN, PLURAL, SHORT_NAMES, SINGULAR,
                                        VERSION)
from omni_operator.api.spec import OmniDeploymentSpec
from omni_operator.api.status import OmniDeploymentStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
# Keys of JSON Schema that structural schemas don't accept, or that only add noise.
_DROP_KEYS = {"title", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Sibling keys (description, default) refine the referenced schema.
        target.update(node)
        node = target
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = {**_resolve(inner, defs), **node}
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP_KEYS}


def _structural(node: Any, *, keep_defaults: bool) -> Any:
    if isinstance(node, list):
        return [_structural(n, keep_defaults=keep_defaults) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            node.pop("anyOf")
            node = {**options[0], **node}
            if node.get("default", 0) is None:
                node.pop("default")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        node["type"] = "object"
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")  # structural schemas prune unknown fields instead
    if node.get("additionalProperties") is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "object" and "maxLength" in node:
        node["maxProperties"] = node.pop("maxLength")
    if node.get("type") == "array" and "maxLength" in node:
        node["maxItems"] = node.pop("maxLength")
    if not keep_defaults:
        node.pop("default", None)
    out = {}
    for key, value in node.items():
        if key == "properties":
            props = {}
            for prop, schema in value.items():
                schema = _structural(schema, keep_defaults=keep_defaults)
                if not keep_defaults:
                    schema.pop("default", None)
                props[prop] = schema
            out[key] = props
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, keep_defaults=keep_defaults)
        else:
            out[key] = value
    return out


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `Model`, `Model | None`; None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in typing.get_args(annotation) else None


def _object_defaults(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Default every always-present object field to its model's full default value.

    The apiserver checks a default against the CEL rules as it stands, without
    filling its nested defaults, so `{}` would fail `minReplicas <= maxReplicas`.
    Optional objects (`X | None`, e.g. talker) get no default: absent stays absent.
    """
    props = schema.get("properties", {})
    for field_name, info in model.model_fields.items():
        sub = props.get(info.alias or field_name)
        cls = _model_class(info.annotation)
        if sub is None or cls is None:
            continue
        _object_defaults(sub, cls)
        if info.default_factory is not None:
            sub["default"] = info.default_factory().model_dump(by_alias=True, exclude_none=True, mode="json")


def _schema_of(model, *, keep_defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve(raw, raw.get("$defs", {}))
    schema = _structural(resolved, keep_defaults=keep_defaults)
    if keep_defaults:
        _object_defaults(schema, model)
    return schema


def _condition_status(kind: str) -> str:
    return f'.status.conditions[?(@.type=="{kind}")].status'


def build_crd() -> dict[str, Any]:
    spec_schema = _schema_of(OmniDeploymentSpec, keep_defaults=True)
    spec_schema["description"] = "Desired state of a Qwen3-Omni deployment."
    status_schema = _schema_of(OmniDeploymentStatus, keep_defaults=False)
    status_schema["description"] = "Observed state, written by the operator."
    # Until the operator's first status, reads show observedGeneration 0, behind metadata.generation:
    # kstatus tools (Flux's wait, kpt, Config Sync) then see a new object as in progress, not as
    # Current the moment it exists (the apiserver applies defaults when it reads from etcd).
    status_schema["default"] = {"observedGeneration": 0}
    root = {
        "type": "object",
        "description": "OmniDeployment runs Qwen3-Omni (thinker, talker, gateway) on GPU node pools.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {"rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
             "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
                        "(child StatefulSet and pod names derive from it)",
             "reason": "FieldValueInvalid"},
            {"rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
             "message": "metadata.name must be a DNS-1035 label (lower case letters, digits, '-', starting with a "
                        "letter): Service names derive from it",
             "reason": "FieldValueInvalid"},
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "qwen3-omni", "app.kubernetes.io/part-of": "qwen3-omni"},
            # Deleting the CRD deletes every OmniDeployment: a chart uninstall must never do that.
            "annotations": {"helm.sh/resource-policy": "keep"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES), "categories": ["qwen3-omni"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string", "jsonPath": _condition_status("Ready")},
                    {"name": "Thinker", "type": "string", "jsonPath": ".status.thinker.ready",
                     "description": "ready/desired thinker replicas"},
                    {"name": "Talker", "type": "string", "jsonPath": ".status.talker.ready",
                     "description": "ready/desired talker replicas"},
                    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus",
                     "description": "GPUs requested by all replicas"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    {"name": "Variant", "type": "string", "jsonPath": ".spec.variant", "priority": 1},
                    {"name": "Sizing", "type": "string", "jsonPath": _condition_status("SizingValid"),
                     "priority": 1},
                    {"name": "Reason", "type": "string",
                     "jsonPath": '.status.conditions[?(@.type=="Ready")].reason', "priority": 1},
                ],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=120)
