"""Signed messages, mutated: a node's pod report and a host's enrolment request.

Each starts from a real message signed with a real key (``hms_mgmt.nodeid``), then one thing
is changed as an attacker who copied it from history would: a field of what was signed, the
signed text itself (a character, a cut, an addition), or the whole signed again by a key of
their own. The check the control worker runs (``check_statement`` in ``check_pod_report``,
``enrol`` behind the NodeRegistry's ``enrol`` update) must accept the message only unchanged,
and refuse anything else with ``AccessDenied`` — never another exception, which would fail
the activity for a reason nobody records. Pure functions; a few hundred examples each in
``make test``, 10,000 in ``make fuzz``."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fuzz_profiles import fuzz
from hypothesis import given
from hypothesis import strategies as st

from hms_mgmt import nodeid, tickets
from hms_mgmt.errors import AccessDenied
from hms_mgmt.models import PodStatus

NODE = "b"
SERVICE = "hms-ach"
KEY = Ed25519PrivateKey.generate()
POD = PodStatus(id=str(uuid.uuid4()), node=NODE, endpoint="10.0.0.2:9001", revision=3, image="registry.gov/hms-ach:1.4",
                ready=True, health="healthy")

values = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                   st.text(max_size=40), st.sampled_from(["", "10.66.66.66:6666", "evil", "a" * 5000]))


def signed_report(pod: PodStatus = POD, service: str = SERVICE, key: Ed25519PrivateKey = KEY) -> str:
    return nodeid.statement(key, NODE, "pod", nodeid.pod_report_message(service, pod))


def mutate_text(signed: str, data: st.DataObject) -> str:
    """One change to the signed text: a character replaced, a cut, something added, the parts swapped."""
    how = data.draw(st.sampled_from(["replace", "cut", "add", "swap", "payload"]))
    at = data.draw(st.integers(0, 1 << 16)) % len(signed)  # drawn alike whatever the text's length
    if how == "replace":
        return signed[:at] + data.draw(st.characters(), label="char") + signed[at + 1:]
    if how == "cut":
        return signed[:at]
    if how == "add":
        return signed[:at] + data.draw(st.text(min_size=1, max_size=20)) + signed[at:]
    if how == "swap":
        head, _, sig = signed.partition(".")
        return f"{sig}.{head}"
    # A claim of the signed payload changed, the signature kept.
    head, _, sig = signed.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    claims[data.draw(st.sampled_from(sorted(claims) + ["x"]))] = data.draw(values)
    raw = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return f"{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{sig}"


def same_bytes(a: str, b: str) -> bool:
    """Whether two signed texts decode to the same payload and signature (base64 has more than one
    spelling of the same bytes: that is the same message, not a forgery)."""
    try:
        return [tickets.unb64url(x) for x in a.split(".", 1)] == [tickets.unb64url(x) for x in b.split(".", 1)]
    except ValueError:
        return False


def report_check(pod: PodStatus, report: str, service: str = SERVICE, node: str = NODE) -> None:
    nodeid.check_statement(nodeid.raw_public(KEY), report, node=node, kind="pod",
                           message=nodeid.pod_report_message(service, pod), max_age_s=nodeid.REPORT_MAX_AGE_S)


def test_an_unchanged_report_is_its_nodes_word() -> None:
    report_check(POD, signed_report())


@fuzz(300, chaos_examples=10_000)
@given(st.data())
def test_a_changed_pod_report_is_refused(data: st.DataObject) -> None:
    original = signed_report()
    report, pod, service, node = original, POD, SERVICE, NODE
    what = data.draw(st.sampled_from(["field", "text", "service", "node", "other key", "other kind", "old"]))
    if what == "field":
        field = data.draw(st.sampled_from(sorted(set(PodStatus.model_fields) - {"report"})))
        try:
            pod = PodStatus.model_validate(POD.model_dump(mode="json") | {field: data.draw(values)})
        except ValueError:
            return  # the signal's own model refuses it before any check
    elif what == "text":
        report = mutate_text(original, data)
    elif what == "service":
        service = data.draw(st.text(max_size=63))
    elif what == "node":
        node = data.draw(st.text(max_size=63))
    elif what == "other key":
        report = signed_report(key=Ed25519PrivateKey.generate())
    elif what == "other kind":
        kind = data.draw(st.sampled_from(["register", "heartbeat", "drained", ""]))
        report = nodeid.statement(KEY, NODE, kind, nodeid.pod_report_message(SERVICE, POD))
    else:
        report = nodeid.statement(KEY, NODE, "pod", nodeid.pod_report_message(SERVICE, POD),
                                  now=time.time() - nodeid.REPORT_MAX_AGE_S - data.draw(st.floats(1, 1e9)))
    if (pod, service, node) == (POD, SERVICE, NODE) and same_bytes(report, original):
        report_check(pod, report, service, node)  # nothing was changed: still the node's word
        return
    with pytest.raises(AccessDenied):
        report_check(pod, report, service, node)


# --- enrolment ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nodeid.JoinToken]:
    d = tmp_path_factory.mktemp("control")
    tickets.ensure_control_key(d)
    text = nodeid.make_join_token(d, temporal_address="10.0.0.1:7233", task_queue="hms-control", ttl_s=3600)
    return d, nodeid.parse_join_token(text)


def test_an_unchanged_enrolment_enrols_its_key(control: tuple[Path, nodeid.JoinToken]) -> None:
    state, token = control
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    cert = nodeid.enrol(state, nodeid.enrol_request(token, node="good", address="10.0.0.3", public_key=key))
    assert nodeid.pub_of(nodeid.check_cert(state, cert, "good")) == key


@fuzz(300, chaos_examples=10_000)
@given(st.data())
def test_a_changed_enrolment_enrols_nothing(control: tuple[Path, nodeid.JoinToken], data: st.DataObject) -> None:
    state, token = control
    node = f"n{uuid.uuid4().hex[:8]}"
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    request = nodeid.enrol_request(token, node=node, address="10.0.0.9", public_key=key)
    what = data.draw(st.sampled_from(["text", "other token", "stale"]))
    if what == "text":
        changed = mutate_text(request, data)
    elif what == "other token":
        forged = nodeid.JoinToken(token.temporal_address, token.task_queue, token.control_fingerprint,
                                  Ed25519PrivateKey.generate())
        changed = nodeid.enrol_request(forged, node=node, address="10.0.0.9", public_key=key)
    else:
        changed = nodeid.enrol_request(token, node=node, address="10.0.0.9", public_key=key,
                                       now=time.time() - nodeid.MAX_SKEW_S - data.draw(st.floats(1, 1e9)))
    if same_bytes(changed, request):
        return  # the same request (another spelling of its bytes): enrolling it is right
    with pytest.raises(AccessDenied):
        nodeid.enrol(state, changed)
    assert node not in nodeid.enrolled(state), "a changed request enrolled its node"
