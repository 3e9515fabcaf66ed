"""Kubernetes resource quantities ("500m", "1.5", "512Mi", "20Gi", "1e3") as numbers and back."""

from __future__ import annotations

import decimal
import functools
import re

_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": "1e-9",
    "u": "1e-6",
    "m": "1e-3",
    "k": "1e3",
    "M": "1e6",
    "G": "1e9",
    "T": "1e12",
    "P": "1e15",
    "E": "1e18",
}

GIB = decimal.Decimal(2**30)


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> decimal.Decimal:
    """The value of a quantity in base units (cores, bytes); ValueError for anything else.

    Kept per text (a Decimal is immutable): every evaluation compares the same few quantities.
    """
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    try:
        value = decimal.Decimal(number)
        if exponent is not None:
            return value.scaleb(int(exponent))
        if suffix in _BINARY:
            return value * _BINARY[suffix]
        if suffix:
            return value * decimal.Decimal(_DECIMAL[suffix])
    except ArithmeticError as e:  # out of Decimal's range ("1e9999999"): not a quantity either
        raise ValueError(f"{text[:40]!r} is out of range for a quantity") from e
    return value


def equal(a: str, b: str) -> bool:
    """Whether two quantities denote the same amount ("1" and "1000m", "1Gi" and "1024Mi")."""
    try:
        return parse(a) == parse(b)
    except ValueError:
        return a == b


def format_cpu(cores: decimal.Decimal) -> str:
    """Cores as Kubernetes writes them: whole cores plain, otherwise millicores ("250m")."""
    millis = (cores * 1000).to_integral_value(rounding=decimal.ROUND_HALF_UP)
    return f"{millis // 1000}" if millis % 1000 == 0 else f"{millis}m"


def format_bytes(value: decimal.Decimal) -> str:
    """Bytes in the largest binary unit that keeps a whole number ("512Mi", "5Gi")."""
    whole = int(value.to_integral_value(rounding=decimal.ROUND_HALF_UP))
    for suffix, size in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
        if size >= _BINARY["Mi"] and whole >= size and whole % size == 0:
            return f"{whole // size}{suffix}"
    if whole >= _BINARY["Mi"]:
        # Usage figures are not exact multiples; Mi is the precision people read them in.
        return f"{round(whole / _BINARY['Mi'])}Mi"
    return str(whole)
