"""The one way a span of time is shown to a person: ``45s``, ``2m 5s``, ``3h 10m``, ``29d 23h``."""

from __future__ import annotations

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """The two largest units, whole numbers, the smaller one left out when it is zero:
    ``0s``, ``59s``, ``2m``, ``2m 5s``, ``1h 1m``, ``2d``, ``29d 23h``. Negative spans read as
    their size (``ago`` or ``in`` is the caller's word); fractions are dropped."""
    rest = int(abs(seconds))
    parts: list[str] = []
    for suffix, size in _UNITS:
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count}{suffix}")
        if len(parts) == 2:
            break
    if not parts:
        return "0s"
    if len(parts) == 2 and parts[1][0] == "0":
        parts.pop()
    return " ".join(parts)
