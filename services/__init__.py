"""Example HMS micro-services (stdlib only) that the orchestrator deploys as pods."""
