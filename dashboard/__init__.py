"""The operators' live web page: services, pods, health, CPU and replicas over time, traffic,
pending approvals with buttons, and events as they happen (aiohttp + server-sent events,
plain HTML/CSS/JS in ``static/``, no build step)."""

from dashboard.server import Dashboard, running_dashboard, serve

__all__ = ["Dashboard", "running_dashboard", "serve"]
