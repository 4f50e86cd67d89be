"""docs/reference/api.md: the OmniDeployment API reference, written from the generated CRD so it
cannot say anything the apiserver does not enforce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jinja2

# Fields whose schema is a Kubernetes core type: named, not expanded (the CRD embeds it whole).
CORE_TYPES = {"affinity": "core/v1 [Affinity](https://kubernetes.io/docs/reference/kubernetes-api/"
                          "workload-resources/pod-v1/#affinity)"}


def _type_of(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    kind = schema.get("type", "object" if schema.get("x-kubernetes-preserve-unknown-fields") else "any")
    if kind == "array":
        return f"[]{_type_of(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type_of(schema['additionalProperties'])}"
    return kind


def _bounds(schema: dict[str, Any]) -> list[str]:
    out = []
    if "enum" in schema:
        out.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, word in (("minimum", ">="), ("maximum", "<=")):
        if key in schema:
            strict = schema.get("exclusive" + key[0].upper() + key[1:]) is True
            value = schema[key]
            number = str(value) if isinstance(value, int) else f"{value:g}"
            out.append(f"{'>' if strict and key == 'minimum' else '<' if strict else word} {number}")
    for key, word in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                      ("minItems", "at least {} items"), ("maxItems", "at most {} items"),
                      ("maxProperties", "at most {} entries")):
        if key in schema:
            out.append(word.format(schema[key]))
    if "pattern" in schema:
        out.append(f"matches `{schema['pattern']}`")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return ""
    value = schema["default"]
    if isinstance(value, (dict, list)) and len(json.dumps(value)) > 40:
        return "(see fields)"
    return f"`{json.dumps(value)}`"


def _rows(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str, str, str]]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        bounds = "; ".join(_bounds(sub))
        description = " ".join(filter(None, [sub.get("description", ""), bounds[:1].upper() + bounds[1:]]))
        core = CORE_TYPES.get(name)
        yield here, core or _type_of(sub), _default(sub), description
        if core:
            continue
        if sub.get("type") == "object" and "properties" in sub:
            yield from _rows(sub, here)
        elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
            yield from _rows(sub["items"], here + "[]")
        elif isinstance(sub.get("additionalProperties"), dict) and "properties" in sub["additionalProperties"]:
            yield from _rows(sub["additionalProperties"], here + ".*")


def _rules(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str, str]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or "(resource)", rule["rule"], rule.get("message", "")
    for name, sub in schema.get("properties", {}).items():
        if name in CORE_TYPES:
            continue
        here = f"{path}.{name}" if path else name
        yield from _rules(sub, here)
        if sub.get("type") == "array":
            yield from _rules(sub.get("items", {}), here + "[]")
        if isinstance(sub.get("additionalProperties"), dict):
            yield from _rules(sub["additionalProperties"], here + ".*")


def _table(rows: Iterator[tuple[str, ...]], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        first, *rest = row
        lines.append(f"| `{first}` | " + " | ".join(_cell(c) for c in rest) + " |")
    return "\n".join(lines)


def api_reference(crd: dict[str, Any]) -> str:
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    spec, status = root["properties"]["spec"], root["properties"]["status"]
    columns = version["additionalPrinterColumns"]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("api.md.j2").render(
        group=crd["spec"]["group"], version=version, names=crd["spec"]["names"], spec=spec, status=status,
        columns=[f"{c['name']} (`{c['jsonPath']}`)" for c in columns if not c.get("priority")],
        wide_columns=[c["name"] for c in columns if c.get("priority")],
        spec_rows=_rows(spec, "spec"), rules=_rules(root, ""), status_rows=_rows(status, "status"), table=_table)
