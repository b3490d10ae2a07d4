"""``python -m router [--port 8000] [--engine builtin|haproxy] [--host 127.0.0.1]``."""

from __future__ import annotations

import argparse
import logging

from hms_mgmt.config import Settings
from hms_mgmt.logtext import setup_logging
from router.server import ENGINES, run


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    p = argparse.ArgumentParser(prog="python -m router", description="the hms traffic router")
    p.add_argument("--port", type=int, default=settings.router_port)
    p.add_argument("--engine", choices=ENGINES, default="builtin")
    p.add_argument("--host", default=settings.router_address)
    args = p.parse_args(argv)
    setup_logging(logging.INFO)
    run(settings, port=args.port, engine=args.engine, host=args.host)


if __name__ == "__main__":
    main()
