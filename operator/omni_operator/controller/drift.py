"""Whether a live child still matches what was rendered for it, and whose it is (pure).

Live objects come in as the dicts the API returns: the apiserver adds defaults, omits empty
values and writes quantities in their canonical form, none of which is drift."""

from __future__ import annotations

import calendar
import time
from typing import Any

from omni_operator.api.quantity import same_quantity


def _scalar_equal(want: Any, have: Any) -> bool:
    # The apiserver normalises some scalars: GPU counts come back as strings, "None" stays "None",
    # quantities in their canonical form (2.5 CPUs as "2500m", 0.5Gi as "512Mi").
    if isinstance(want, bool) or isinstance(have, bool):
        return want == have
    return str(want) == str(have) or same_quantity(want, have)


def _empty(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def is_subset(want: Any, have: Any) -> bool:
    """True when every field we render is present with the same value in the live object.

    Fields the apiserver adds (defaults, status, other managers' fields) are ignored;
    lists must have the same length and match item by item.
    """
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        # The apiserver omits empty and false values (omitempty): absent equals False/""/{}/[].
        return all(is_subset(v, have[k]) if k in have else _empty(v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        return all(is_subset(w, h) for w, h in zip(want, have))
    return _scalar_equal(want, have)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences", []))


def parse_timestamp(value: str | None) -> float | None:
    """Seconds since the epoch of an API timestamp ("2026-01-02T03:04:05Z"); None if there is none."""
    if not value:
        return None
    try:
        return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
