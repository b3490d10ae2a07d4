"""``hms``: the operator's command line.

``hms up`` / ``hms demo`` run the whole stack on one machine (:mod:`hms_mgmt.cli.stack`);
every other command (:mod:`hms_mgmt.cli.commands`) is a thin client of
:class:`hms_mgmt.orchestrator.Orchestrator`, so the CLI, the Python API and the dashboard all
see the same workflows. :mod:`hms_mgmt.cli.render` draws the tables.
"""

from hms_mgmt.cli.interrupt import catch_interrupts

catch_interrupts()  # before the heavy imports: a Ctrl-C during them is not lost (see that module)

from hms_mgmt.cli.commands import app  # noqa: E402

__all__ = ["app"]
