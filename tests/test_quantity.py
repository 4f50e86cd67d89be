"""Resource quantities (pure): parsing, comparing written-differently amounts, and the spec's
checks that mirror Pod validation (the CRD's CEL rules are tested on the apiserver)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from omni_operator.api.quantity import parse_quantity, same_quantity
from omni_operator.api.spec import Resources
from omni_operator.controller.drift import is_subset

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("text, amount", [
    ("500m", Decimal("0.5")), ("2.5", Decimal("2.5")), (2.5, Decimal("2.5")), (4, Decimal(4)),
    ("16Gi", Decimal(16 * 2 ** 30)), ("1.5G", Decimal(1_500_000_000)), ("1e3", Decimal(1000)), (".5", Decimal("0.5")),
])
def test_quantities_parse_exactly(text, amount):
    assert parse_quantity(text) == amount


@pytest.mark.parametrize("text", ["lots", "1.5.2", "1Gb", "", True, float("inf"), "1 Gi"])
def test_what_is_not_a_quantity_is_refused(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_the_same_amount_written_two_ways_is_no_drift():
    assert same_quantity(2.5, "2500m") and same_quantity("0.5Gi", "512Mi") and same_quantity("1k", "1000")
    assert not same_quantity("1Gi", "1G") and not same_quantity("abc", "abc")
    assert is_subset({"requests": {"cpu": 2.5, "memory": "0.5Gi"}}, {"requests": {"cpu": "2500m", "memory": "512Mi"}})
    assert not is_subset({"requests": {"cpu": 2.5}}, {"requests": {"cpu": "2"}})


def test_resources_take_what_pods_take_and_refuse_what_they_refuse():
    ok = Resources.model_validate({"requests": {"cpu": "2.5", "memory": "512Mi", "nvidia.com/gpu": 1},
                                   "limits": {"memory": "1Gi"}})
    assert ok.requests["cpu"] == "2.5"
    for bad, needle in [
        ({"requests": {"memory": "1e100"}}, "less than 1Ei"),
        ({"limits": {"cpu": -1}}, "not a quantity"),
        ({"requests": {"not a resource!": "1"}}, "not a resource name"),
        ({"requests": {"memory": "lots"}}, "not a quantity"),
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}, "at most its limit"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            Resources.model_validate(bad)
