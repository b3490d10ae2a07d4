"""``hms deploy FILE --dry-run``: the admission verdict, as a table or as the DryRunVerdict model."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from hms_mgmt.cli.common import exit_code
from hms_mgmt.cli.output import Format, show
from hms_mgmt.cli.render import _when, out, shown
from hms_mgmt.models import DryRunVerdict


def verdict_exit(verdict: DryRunVerdict) -> int:
    """0 when a deploy would be admitted (an approval still to come included); else the exit code
    of the exception a deploy would raise."""
    error = verdict.error()
    return 0 if error is None else int(exit_code(error))


def show_verdict(verdict: DryRunVerdict, fmt: Format) -> None:
    show(verdict, fmt, lambda: _tables(verdict))


def _tables(v: DryRunVerdict) -> None:
    word = ("would be admitted, after a gov_approver's approval" if v.admitted and v.needs_approval
            else "would be admitted" if v.admitted else "would be refused")
    out.print(Text.assemble((shown(v.service), "bold"), f" {word} (dry run: nothing started)",
                            style="green" if v.admitted else "red"))
    checks = Table("check", "", "detail", title="admission")
    for c in v.checks:
        checks.add_row(shown(c.name), Text("ok", "green") if c.ok else Text(shown(c.kind or "no"), "red"),
                       shown(c.detail))
    out.print(checks)
    if v.placement:
        nodes = Table("node", "new pods", "pods left", "cpu left", "memory left (MB)",
                      title=f"placement of {v.replicas} new pod(s)" + (f", {v.unplaced} fit nowhere" if v.unplaced else ""))
        for n in v.placement:
            nodes.add_row(shown(n.node), str(n.pods), str(n.pods_left), f"{n.cpu_left:g}", str(n.memory_left_mb))
        out.print(nodes)
    if v.change is not None and v.change.changes:
        diff = Table("field", "running", "new", title=f"changes to revision {v.change.from_revision}")
        for ch in v.change.changes:
            diff.add_row(shown(ch.field), shown(str(ch.old)), shown(str(ch.new)))
        out.print(diff)
    if v.change is not None and v.change.rollout is not None:
        r = v.change.rollout
        out.print(f"rollout: {r.replicas} pod(s), surge {r.surge}, unavailable {r.unavailable}, "
                  f"{len(r.rounds)} round(s): " + ", ".join(f"+{x.start}/-{x.retire}" for x in r.rounds))
    if v.time_slots:
        slots = Table("time slot", "on", "next start", "next end", title="time slots")
        for s in v.time_slots:
            slots.add_row(shown(s.name), "yes" if s.on else "no", _when(s.next_start), _when(s.next_end))
        out.print(slots)
    if v.image_id:
        out.print(Text.assemble(("image ", "bold"), shown(f"{v.image} pinned to {v.image_id}")))
