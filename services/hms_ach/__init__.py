"""hms-ach: accepts ACH payments and reports their status (in memory, per pod)."""

from __future__ import annotations

import re
import time
import uuid

from services.common import (
    HttpError,
    Records,
    Request,
    Response,
    Route,
    Service,
    parse_number,
    pod_id,
    require,
    route,
)

NAME = "hms-ach"
# Routing numbers are 9 digits; account numbers vary by bank, so only sanity-check them.
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9-]{4,34}$")
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


def build_service() -> Service:
    """Build the service; state lives in closures so each pod process has its own ledger."""
    payments = Records("payment_id")
    pod = pod_id()

    def create(req: Request) -> Response:
        data = req.json()
        amount = parse_number(require(data, "amount"), "amount", 0.01, 1e9)
        account = require(data, "account")
        if not isinstance(account, str) or not _ACCOUNT_RE.match(account):
            raise HttpError(400, "account must be 4-34 letters, digits or dashes", field="account")
        currency = data.get("currency", "USD")
        if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
            raise HttpError(400, "currency must be a 3-letter ISO code", field="currency")
        payment = payments.add({
            "payment_id": f"pay_{uuid.uuid4().hex}",
            "status": "accepted",
            "amount": round(amount, 2),
            "currency": currency,
            "account": account,
            "created_at": time.time(),
            "pod": pod,
        })
        return Response(202, {"payment_id": payment["payment_id"], "status": "accepted", "pod": pod})

    def get(req: Request) -> Response:
        return Response(200, payments.get(req.params["id"]))

    routes: list[Route] = [
        route("POST", "/payments", create),
        route("GET", r"/payments/(?P<id>[^/]+)", get),
    ]
    return Service(NAME, routes)
