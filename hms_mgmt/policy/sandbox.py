"""What a process pod may take from its spec, given the image catalog entry it runs.

A trust signature on the process runtime covers the catalog entry (its command, env and cwd),
not the spec: so a spec may not replace the command, and may set only the environment names the
entry lists (``allow_env: [NAME, ...]``) or a few harmless defaults. Everything else would let a
signed image run something nobody signed (``PYTHONWARNINGS``, ``BROWSER``, ``LD_PRELOAD`` tricks).

Pure: the node checks it where the pod starts, and admission can call it to refuse early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hms_mgmt.models import ServiceSpec

# Names any image may take from a spec: they select nothing executable.
SAFE_ENV = frozenset({"TZ", "LOG_LEVEL", "LANG", "LC_ALL"})

# Set by the runtime itself, whatever the spec says.
RUNTIME_ENV = frozenset({"PATH", "HOME", "PORT", "HOST", "HMS_POD_ID", "HMS_SERVICE", "HMS_REVISION",
                         "PYTHONPATH", "PYTHONUNBUFFERED"})


def allowed_env(entry: Mapping[str, Any]) -> frozenset[str]:
    """The environment names a spec may set for pods of this catalog entry."""
    listed = entry.get("allow_env") or []
    return (SAFE_ENV | frozenset(str(n) for n in listed)) - RUNTIME_ENV


def check_process_spec(spec: ServiceSpec, entry: Mapping[str, Any]) -> list[str]:
    """Problems with running ``spec`` as a process pod of catalog ``entry``, each naming the
    field (``command``, ``env.NAME``); empty when it may run."""
    problems: list[str] = []
    if spec.command is not None and not entry.get("allow_command", False):
        problems.append(
            f"command: the process runtime runs the image catalog's command for {spec.image} (the signature "
            "covers only that); remove command from the spec, or set allow_command: true in the catalog entry "
            "and re-sign the image"
        )
    allowed = allowed_env(entry)
    for name in sorted(set(spec.env) - allowed):
        problems.append(
            f"env.{name}: not allowed for {spec.image} on the process runtime (allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}); list it under allow_env in the image catalog entry "
            "and re-sign the image"
        )
    return problems
