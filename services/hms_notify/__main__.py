"""Entry point: `python3 -m services.hms_notify`."""

from __future__ import annotations

from services.common import main
from services.hms_notify import build_service

if __name__ == "__main__":
    main(build_service())
