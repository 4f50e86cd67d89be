"""Kubernetes resource quantities (pure): parse "500m", "2.5", "16Gi", "1e3" to exact numbers,
to compare requests with limits and a rendered value with the apiserver's canonical form of it."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

# The grammar Kubernetes parses (wider than the CRD's pattern for strings, api.QUANTITY).
_GRAMMAR = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[mkMGTPE])?$"
LARGEST = Decimal(2) ** 60  # 1Ei: far above any request, well inside what the apiserver stores

_BINARY = {f"{p}i": Decimal(1024) ** (i + 1) for i, p in enumerate("KMGTPE")}
_DECIMAL = {"m": Decimal("0.001"), "": Decimal(1), "k": Decimal(1000),
            **{p: Decimal(1000) ** (i + 2) for i, p in enumerate("MGTPE")}}


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact amount a quantity stands for; ValueError when it is not one."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{value!r} is not a quantity")
    text = repr(value) if isinstance(value, float) else str(value)
    m = re.match(_GRAMMAR, text)
    if not m:
        raise ValueError(f"{value!r} is not a quantity")
    number, suffix = text[: m.start(3)] if m.group(3) else text, m.group(3) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * (_BINARY.get(suffix) or _DECIMAL[suffix])
    except (InvalidOperation, KeyError, ValueError):
        raise ValueError(f"{value!r} is not a quantity") from None


def same_quantity(a: object, b: object) -> bool:
    """Whether two values are the same quantity written differently ("2.5" and "2500m")."""
    try:
        return parse_quantity(a) == parse_quantity(b)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False
