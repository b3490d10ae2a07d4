"""hms-frm: validates applicant documents against a few simple rules.

An invalid document is a normal answer (200, valid=false, errors naming fields);
only an unparseable request is a 400.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from services.common import Request, Response, Route, Service, pod_id, route

NAME = "hms-frm"
DOCUMENT_TYPES = frozenset({"passport", "drivers_license", "national_id", "utility_bill", "bank_statement"})


def validate(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Return the rule violations; an empty list means the document is valid."""
    errors: list[dict[str, str]] = []
    applicant = doc.get("applicant_id")
    if applicant is None or (isinstance(applicant, str) and not applicant.strip()):
        errors.append({"field": "applicant_id", "error": "required"})
    elif not isinstance(applicant, (str, int)) or isinstance(applicant, bool):
        errors.append({"field": "applicant_id", "error": "must be a string or integer"})
    doc_type = doc.get("document_type")
    if doc_type is None or doc_type == "":
        errors.append({"field": "document_type", "error": "required"})
    elif doc_type not in DOCUMENT_TYPES:
        errors.append({"field": "document_type", "error": f"must be one of {sorted(DOCUMENT_TYPES)}"})
    expires = doc.get("expires_on")
    if expires is not None:
        try:
            if dt.date.fromisoformat(str(expires)) < dt.date.today():
                errors.append({"field": "expires_on", "error": "document has expired"})
        except ValueError:
            errors.append({"field": "expires_on", "error": "must be an ISO date (YYYY-MM-DD)"})
    return errors


def build_service() -> Service:
    pod = pod_id()

    def validate_endpoint(req: Request) -> Response:
        data = req.json()
        errors = validate(data)
        return Response(200, {"valid": not errors, "errors": errors, "pod": pod})

    routes: list[Route] = [route("POST", "/documents/validate", validate_endpoint)]
    return Service(NAME, routes)
