"""The scenario of issue 25, as a recorder: a 3-pod service at v1, updated to v2 under steady
load through the router, then a broken v3; every run records the phase, the rollout status,
each new pod's fate and the lowest ready count seen, so a run that misses explains itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conftest import seed_spec

from hms_mgmt.errors import HmsError
from hms_mgmt.models import DeployOutput, ServiceStatus

# One rollout's timings, as a user would set them (the defaults but a quicker health check and drain).
TIMINGS = {"health_interval_s": 1.0, "drain_s": 1.0, "min_ready_s": 1.0}
REPLICAS = 3
ENDED = ("rolled_back", "failed", "completed")


@dataclass
class Sample:
    t: float
    phase: str
    rollout: str
    revision: int
    ready: int
    pods: list[tuple[str, int, bool, str]]
    waiting_for: str = ""


@dataclass
class RunRecord:
    run: int
    kind: str
    v2_s: float = 0.0
    rolled_back_s: float | None = None  # from the v3 update call to every pod back on v2, ready
    lowest_ready: int | None = None
    lowest_routed: int | None = None
    failed_requests: int = 0
    requests: int = 0
    new_pods: list[dict[str, str]] = field(default_factory=list)  # each v3 pod's fate
    error: str = ""
    outcome: str = ""
    timeline: list[Sample] = field(default_factory=list)  # phase / rollout state changes

    def line(self) -> str:
        took = "MISS" if self.rolled_back_s is None else f"{self.rolled_back_s:.1f}s"
        return (f"run {self.run} ({self.kind}): v2 {self.v2_s:.1f}s; v3 rolled back {took}; lowest ready "
                f"{self.lowest_ready} (router {self.lowest_routed}); {len(self.new_pods)} v3 pods; "
                f"{self.failed_requests}/{self.requests} requests failed; {self.error}")


def spec(name: str, **over: object) -> dict[str, object]:
    return seed_spec(name=name, min_replicas=REPLICAS, max_replicas=REPLICAS, **TIMINGS) | over


# The broken v3 kinds (Docker images; the example images' code has no crash-after knob built in).
CRASH_3S = ["sh", "-c", "exec timeout -s KILL 4 python3 -m services.$HMS_SERVICE_MODULE"]  # answers ~1 s in


def broken(kind: str, exits_image: str, v2_image: str) -> dict[str, object]:
    """The v3 spec's changes for ``kind``: exits at once, never answers (503), or crashes ~3 s
    after it first answers, inside ``min_ready_s``."""
    return {"exits": {"image": exits_image},
            "unhealthy": {"image": v2_image, "env": {"HMS_FAIL_HEALTH": "1"}},
            "crashes": {"image": v2_image, "command": CRASH_3S, "min_ready_s": 6.0}}[kind]


class Sampler:
    """status() every 0.2 s: the lowest ready count and every change of phase or rollout state."""

    def __init__(self, orch, name: str, record: RunRecord, routed=None) -> None:  # noqa: ANN001
        self.orch, self.name, self.record, self.routed = orch, name, record, routed
        self.t0 = time.monotonic()
        self.last: ServiceStatus | None = None
        self.children: list[str] = []  # the rolling DeployWorkflows seen, in order
        self.task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        seen: tuple[str, str, str] | None = None
        while True:
            with contextlib.suppress(HmsError, OSError):
                st = await self.orch.status(self.name, live=False)
                self.last = st
                ready = sum(1 for p in st.pods if p.ready and p.health != "exited")
                r = self.record
                r.lowest_ready = ready if r.lowest_ready is None else min(r.lowest_ready, ready)
                key = (st.phase, st.rollout.state if st.rollout else "", st.waiting_for.reason if st.waiting_for else "")
                if st.rollout is not None and st.rollout.workflow_id not in self.children:
                    self.children.append(st.rollout.workflow_id)
                if key != seen:
                    seen = key
                    r.timeline.append(Sample(t=round(time.monotonic() - self.t0, 2), phase=st.phase, rollout=key[1],
                                             revision=st.revision, ready=ready,
                                             waiting_for=key[2],
                                             pods=[(p.id[:8], p.revision, p.ready, p.health) for p in st.pods]))
            await self._routed()
            await asyncio.sleep(0.2)

    async def _routed(self) -> None:
        if self.routed is None:
            return
        with contextlib.suppress(Exception):
            t = await self.routed.table(self.name)
            ready = sum(e["state"] == "ready" for e in t["endpoints"])
            r = self.record
            r.lowest_routed = ready if r.lowest_routed is None else min(r.lowest_routed, ready)

    def stop(self) -> None:
        self.task.cancel()


def back_on(st: ServiceStatus | None, revision: int, failed: int) -> bool:
    """The rollout to ``failed`` ended and every pod runs ``revision`` again, ready."""
    return (st is not None and st.rollout is not None and st.rollout.to_revision == failed
            and st.rollout.state in ENDED and st.revision == revision
            and len(st.pods) == REPLICAS and all(p.ready and p.revision == revision for p in st.pods))


async def v3_fates(client, children: list[str], revision: int) -> list[dict[str, str]]:  # noqa: ANN001
    """Each new pod of the failed revision: how its start ended (the rolling child's result)."""
    out: list[dict[str, str]] = []
    for wf_id in [c for c in children if f"-deploy-{revision}-" in c]:
        handle = client.get_workflow_handle(wf_id, result_type=DeployOutput)
        try:
            res = await asyncio.wait_for(handle.result(), 1.0)
        except Exception as e:  # noqa: BLE001 - still running (a miss): say so
            out.append({"pod": "-", "fate": f"{wf_id}: no result ({type(e).__name__})"})
        else:
            out += [{"pod": f.pod_id[:8], "fate": f.reason} for f in res.failed]
            out += [{"pod": p.id[:8], "fate": f"ready (rev {p.revision})"} for p in res.pods if p.revision == revision]
            if res.error:
                out.append({"pod": "-", "fate": f"child error: {res.error}"})
    return out


async def dump_histories(client, ids: list[str], out: Path) -> None:  # noqa: ANN001
    """The service's execution and its rolling children as JSON, for a run that missed."""
    out.mkdir(parents=True, exist_ok=True)
    for wf_id in ids:
        with contextlib.suppress(Exception):
            history = await client.get_workflow_handle(wf_id).fetch_history()
            (out / f"{wf_id}.json").write_text(history.to_json())


def write(records: list[RunRecord], path: Path) -> None:
    path.write_text("\n".join(json.dumps(asdict(r)) for r in records) + "\n")


__all__ = ["broken", "RunRecord", "Sampler", "back_on", "dump_histories", "spec", "v3_fates", "write"]
