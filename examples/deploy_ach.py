"""The seed's example, line for line: deploy HMS-ACH with one call.

Needs a running management layer (`make demo`, or `hms up` in another terminal).
"""

from hms_mgmt import orchestrator

payment_service = {
    "name": "hms-ach",
    "image": "registry.gov/hms-ach:1.4",
    "min_replicas": 2,
    "max_replicas": 10,
    "cpu_target": 60            # % per pod
}

orchestrator.deploy(payment_service)
