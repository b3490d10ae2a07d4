"""``python -m worker [--node NAME] [--no-control | --no-node]``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from hms_mgmt.logtext import setup_logging
from worker.main import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--node", help="this node's name (default: HMS_NODE or the host name)")
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument("--no-control", action="store_true", help="run only the node's pod activities")
    roles.add_argument("--no-node", action="store_true",
                       help="run only the control plane (workflows, control activities): no pods here")
    parser.add_argument("--runtime", choices=["auto", "docker", "process"])
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics on 127.0.0.1 (default 9464; 0: off)")
    args = parser.parse_args()
    setup_logging(logging.INFO)
    asyncio.run(main(control=not args.no_control, node_worker=not args.no_node, node=args.node,
                     runtime=args.runtime, metrics_port=args.metrics_port))
