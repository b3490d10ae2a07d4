"""hms-notify: queues SMS messages and reports their delivery status (in memory, per pod)."""

from __future__ import annotations

import os
import re
import time
import uuid

from services.common import HttpError, Records, Request, Response, Route, Service, pod_id, require, route

NAME = "hms-notify"
_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
MAX_MESSAGE_CHARS = 1600


def build_service() -> Service:
    """Build the service; a queued SMS reads as "sent" once HMS_SMS_SEND_DELAY_S has passed."""
    send_delay = float(os.environ.get("HMS_SMS_SEND_DELAY_S") or 1.0)
    messages = Records("sms_id")
    pod = pod_id()

    def create(req: Request) -> Response:
        data = req.json()
        to = require(data, "to")
        if not isinstance(to, str) or not _E164_RE.match(to.replace(" ", "")):
            raise HttpError(400, "to must be an E.164 phone number like +15551234567", field="to")
        message = require(data, "message")
        if not isinstance(message, str):
            raise HttpError(400, "message must be a string", field="message")
        if len(message) > MAX_MESSAGE_CHARS:
            raise HttpError(400, f"message longer than {MAX_MESSAGE_CHARS} characters", field="message")
        sms = messages.add({
            "sms_id": f"sms_{uuid.uuid4().hex}",
            "to": to.replace(" ", ""),
            "length": len(message),
            "created_at": time.time(),
            "pod": pod,
        })
        return Response(202, {"sms_id": sms["sms_id"], "status": "queued", "pod": pod})

    def get(req: Request) -> Response:
        sms = messages.get(req.params["id"])
        status = "sent" if time.time() - sms["created_at"] >= send_delay else "queued"
        return Response(200, {**sms, "status": status})

    routes: list[Route] = [
        route("POST", "/sms", create),
        route("GET", r"/sms/(?P<id>[^/]+)", get),
    ]
    return Service(NAME, routes)
