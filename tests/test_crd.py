"""Tier 2: the generated CRD, its structural schema, and spec validation messages."""

from __future__ import annotations

import jsonschema
import pytest

from omni_operator.api.crd import build_crd
from omni_operator.api.spec import describe_validation_error, parse_spec

from .helpers import EXAMPLES, ROOT, crd_schema, example, load_yaml, validate_against_crd

pytestmark = pytest.mark.schema


def test_checked_in_crd_is_what_the_models_generate():
    assert load_yaml(ROOT / "crds" / "omnideployment.yaml") == build_crd()


def _walk(node, path="$"):
    yield path, node
    for key in ("properties", "additionalProperties"):
        value = node.get(key)
        if key == "properties" and value:
            for name, child in value.items():
                yield from _walk(child, f"{path}.{name}")
        elif isinstance(value, dict):
            yield from _walk(value, f"{path}[*]")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural():
    for path, node in _walk(crd_schema()):
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "title"):
            assert banned not in node, f"{path} has {banned}"
        typed = ("type" in node or node.get("x-kubernetes-int-or-string")
                 or node.get("x-kubernetes-preserve-unknown-fields"))
        assert typed, f"{path} has no type"
        if "properties" in node:
            assert "additionalProperties" not in node, f"{path} mixes properties and additionalProperties"
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node


def test_crd_has_printer_columns_subresources_and_cel():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == \
        ["Ready", "Thinker", "Talker", "GPUs", "Age"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert crd["spec"]["names"]["shortNames"] == ["omni"]
    rules = [r["rule"] for _, n in _walk(version["schema"]["openAPIV3Schema"])
             for r in n.get("x-kubernetes-validations", [])]
    assert "self.minReplicas <= self.maxReplicas" in rules
    assert any("self.variant == 'Instruct'" in r for r in rules)
    assert any("metadata.name.size()" in r for r in rules)


def test_a_new_object_reads_as_not_yet_observed_until_the_operator_writes_status():
    """kstatus skips the generation check when status.observedGeneration is absent and then calls an
    object without conditions Current: with this default (applied as the apiserver reads from etcd)
    a new OmniDeployment is InProgress for Flux, kpt and Config Sync until the operator has seen it.
    tests/test_gitops.py sees the apiserver serve it."""
    status = crd_schema()["properties"]["status"]
    assert status["default"] == {"observedGeneration": 0}
    assert status["properties"]["observedGeneration"]["type"] == "integer"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_against_the_crd(path):
    validate_against_crd(load_yaml(path))


@pytest.mark.parametrize("mutate,fragment", [
    (lambda s: s["workload"].update(maxVideoSeconds=-5), "maxVideoSeconds"),
    (lambda s: s["thinker"].update(minReplicas="two"), "minReplicas"),
    (lambda s: s.update(variant="Turbo"), "Turbo"),
    (lambda s: s["thinker"]["gpu"].update(utilization=1.5), "utilization"),
    (lambda s: s["model"].update(repo="not a repo"), "not a repo"),
])
def test_crd_schema_refuses_bad_values(mutate, fragment):
    resource = example()
    mutate(resource["spec"])
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_against_crd(resource)
    assert fragment in str(err.value)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s["thinker"].update(minReplicas=5, maxReplicas=2),
     "spec.thinker: minReplicas (5) must not exceed maxReplicas (2)"),
    (lambda s: s.update(variant="Thinking"), "talker is only available for variant Instruct"),
    (lambda s: s["model"].update(pvc={"claimName": "w"}), "set either model.repo or model.pvc, not both"),
    (lambda s: s.update(colour="blue"), "spec.colour: Extra inputs are not permitted"),
    (lambda s: s["workload"].update(maxVideoSeconds=-1),
     "spec.workload.maxVideoSeconds: Input should be greater than or equal to 0"),
    (lambda s: s["talker"].update(gpu={"memoryGiB": "lots"}), "spec.talker.gpu.memoryGiB"),
    (lambda s: s["autoscaling"].update(scaleUpStabilizationSeconds=600, scaleDownStabilizationSeconds=60),
     "scaleDownStabilizationSeconds must be at least scaleUpStabilizationSeconds"),
])
def test_bad_specs_get_readable_messages(mutate, message):
    spec = example()["spec"]
    mutate(spec)
    with pytest.raises(Exception) as err:
        parse_spec(spec)
    assert message in describe_validation_error(err.value)


def test_defaults_match_between_models_and_crd():
    """The apiserver's defaults (from the CRD) and the operator's (pydantic) are the same numbers."""
    schema = crd_schema()["properties"]["spec"]["properties"]
    spec = parse_spec({})
    assert schema["thinker"]["properties"]["gpu"]["properties"]["memoryGiB"]["default"] == spec.thinker.gpu.memory_gib
    talker_gpu = schema["talker"]["properties"]["gpu"]["properties"]
    assert talker_gpu["memoryGiB"]["default"] == parse_spec({"talker": {}}).talker.gpu.memory_gib == 24
    assert schema["workload"]["properties"]["maxVideoSeconds"]["default"] == spec.workload.max_video_seconds
    assert "default" not in schema["talker"], "talker must stay absent for variants without speech"


@pytest.mark.cluster
def test_the_embedded_core_schemas_are_what_the_apiserver_publishes(cluster):
    """core_schemas.json (affinity's schema) is current with the kube-apiserver the tests run."""
    from e2e.core_schemas import OUT, core_schemas, render

    assert OUT.read_text() == render(core_schemas(cluster)), "stale: run python -m e2e.core_schemas"
