"""Kubernetes resource quantities (pure): "500m", "2.5", "16Gi", "1e3" as exact numbers, to compare
requests with limits and a rendered value with the apiserver's canonical form of it.

The arithmetic is the client library's (`kubernetes.utils.parse_quantity`); it takes anything
`Decimal` takes ("1 Gi", "Infinity", True), so the text is first held to the grammar the
apiserver parses."""

from __future__ import annotations

import re
from decimal import Decimal

from kubernetes.utils import parse_quantity as _library_parse

# The grammar Kubernetes parses (wider than the CRD's pattern for strings, api.spec.QUANTITY).
_GRAMMAR = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[mkMGTPE])?")
LARGEST = Decimal(2) ** 60  # 1Ei: far above any request, well inside what the apiserver stores


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact amount a quantity stands for; ValueError when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a quantity")
    text = repr(value) if isinstance(value, float) else str(value)
    if not _GRAMMAR.fullmatch(text):
        raise ValueError(f"{value!r} is not a quantity")
    return _library_parse(text)


def same_quantity(a: object, b: object) -> bool:
    """Whether two values are the same quantity written differently ("2.5" and "2500m")."""
    try:
        return parse_quantity(a) == parse_quantity(b)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False
