"""``hms`` with fuzzed arguments: every command line ends in a clean exit — 0, 1 (an error, one
line) or 2 (a usage error or an invalid spec) — never a traceback.

Run in-process with typer's CliRunner, against a throwaway state directory and a Temporal
address where nothing listens (connecting fails at once, which is a clean error too). Commands
that start servers (up, demo, worker, router, dashboard) and ``events --follow`` only get
arguments that cannot start them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_profiles import fuzz
from hypothesis import example, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from hms_mgmt.cli import app
from hms_mgmt.cli.common import Exit
from hms_mgmt.testing import free_port

# Each command's arguments and options; a value slot is drawn from VALUES (or a file slot from FILES).
COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("deploy",): ["FILE", "--wait", "--no-wait", "--timeout"],
    ("status",): ["NAME"],
    ("logs",): ["NAME", "NAME", "--tail"],
    ("undeploy",): ["NAME", "--no-wait", "--wait"],
    ("events",): ["--service"],
    ("scale",): ["NAME", "INT", "--reason"],
    ("approve",): ["NAME", "--reason"],
    ("reject",): ["NAME", "--reason"],
    ("auth", "init"): ["--force"],
    ("auth", "issue"): ["--user", "--role", "--ttl", "--save"],
    ("auth", "whoami"): [],
    ("image", "sign"): ["IMAGE", "--runtime"],
    ("image", "list"): [],
    ("image", "revoke"): ["IMAGE"],
    ("rollout", "status"): ["NAME"],
    ("rollout", "history"): ["NAME"],
    ("rollout", "undo"): ["NAME", "--to-revision", "--no-wait", "--timeout"],
    ("nodes",): ["--json"],
    ("init",): ["--sign", "--runtime"],
    ("auth",): [], ("image",): [], ("rollout",): [], (): [],
}
FLAGS = {"--wait", "--no-wait", "--force", "--save", "--json"}
# Servers: only a bad option or --help, which exit before anything starts.
SERVERS = ["up", "demo", "worker", "router", "dashboard"]

VALUES = st.one_of(
    st.text(max_size=12).filter(lambda t: "\x00" not in t),  # argv cannot carry NUL
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "-", "--", "-1", "0", "1e309", "nan", "inf", "-inf", "0x10", "1_000", "3.5", "9" * 400,
                     "hms-ach", "HMS-ACH", "a" * 300, "registry.gov/hms-ach:1.4", "docker", "process", "auto",
                     "ops_admin", "gov_approver", "viewer", "root", "8h", "0s", "-5m", "99999999d", "1e400h",
                     "--help", "--wait", "--bogus", "-x", "ünï", "😀", "a b", "$(id)", "../..", "%s%n"]),
)


def files(tmp: Path) -> list[str]:
    specs = tmp / "specs"
    specs.mkdir(exist_ok=True)
    good = specs / "good.yaml"
    good.write_text("name: hms-fuzz\nimage: registry.gov/hms-ach:1.4\nmin_replicas: 1\nmax_replicas: 2\ncpu_target: 60\n")
    (specs / "bad.yaml").write_text("name: [\n")
    (specs / "list.yaml").write_text("- 1\n- 2\n")
    (specs / "binary.yaml").write_bytes(b"\xff\xfe\x00name")
    (specs / "wrong.yaml").write_text("name: Hms Fuzz\nimage: ''\nmin_replicas: -1\nmax_replicas: 1e9\ncpu_target: x\n")
    return [str(good), str(specs / "bad.yaml"), str(specs / "list.yaml"), str(specs / "binary.yaml"),
            str(specs / "wrong.yaml"), str(specs), str(specs / "missing.yaml"), "/dev/null", "-"]


@st.composite
def command_lines(draw: st.DrawFn, file_choices: list[str]) -> list[str]:
    if draw(st.integers(0, 19)) == 0:
        return [draw(st.sampled_from(SERVERS)), draw(st.sampled_from(["--help", "--bogus", "--port=x", "-z"]))]
    words = draw(st.sampled_from(sorted(COMMANDS)))
    args = list(words)
    for slot in draw(st.lists(st.sampled_from(COMMANDS[words] or ["NAME"]), max_size=6)):
        if slot == "FILE":
            args.append(draw(st.sampled_from(file_choices) | VALUES))
        elif slot in FLAGS:
            args.append(slot)
        elif slot.startswith("--"):
            args += [slot, draw(VALUES)] if draw(st.integers(0, 9)) else [slot]  # sometimes the value is missing
        else:
            args.append(draw(VALUES))
    if draw(st.integers(0, 9)) == 0:
        args.insert(draw(st.integers(0, len(args))), draw(VALUES))  # a stray word anywhere
    return args


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Nothing the fuzzer sends can reach a real stack or state: HMS_* from the test only, the
    working directory a temp one (relative paths land there), nothing listening at the address."""
    for key in [k for k in __import__("os").environ if k.startswith("HMS_")]:
        monkeypatch.delenv(key)
    state = tmp_path / "state"
    monkeypatch.setenv("HMS_STATE_DIR", str(state))
    monkeypatch.setenv("HMS_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("HMS_RUNTIME", "process")
    monkeypatch.setenv("HMS_NODE", "fuzz")
    monkeypatch.chdir(tmp_path)
    return CliRunner(), files(tmp_path), state


def run(runner: CliRunner, args: list[str]):
    result = runner.invoke(app, args, catch_exceptions=True)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"hms {args!r} raised {result.exception!r}\n{output}")
    assert "Traceback" not in output, f"hms {args!r} printed a traceback:\n{output}"
    assert result.exit_code in set(Exit), f"hms {args!r} exited {result.exit_code}:\n{output}"  # the documented codes
    return result


def test_cli_arguments_exit_cleanly(cli):
    runner, file_choices, _ = cli

    @fuzz(200)
    @given(command_lines(file_choices))
    @example(["deploy", file_choices[5]])  # a directory
    @example(["deploy", file_choices[3]])  # not UTF-8
    @example(["deploy", "/dev/zero"])
    @example(["deploy", "9" * 400])  # a file name too long for the file system
    @example(["scale", "hms-ach", "9" * 400])
    @example(["auth", "issue", "--user", "a", "--role", "viewer", "--ttl", "1e400h"])
    @example(["auth", "issue", "--user", "a", "--role", "viewer", "--ttl", "99999999d"])
    @example(["logs", "hms-ach", "x", "--tail", "-1"])
    @example(["rollout", "undo", "hms-ach", "--to-revision", "-5", "--timeout", "nan"])
    @example(["image", "sign", "not an image", "--runtime", "process"])
    @example(["init", "--runtime", "nonsense"])
    def check(args: list[str]) -> None:
        run(runner, args)

    check()


def test_the_fuzzed_errors_are_the_users_not_the_servers(cli):
    """The clean exits above say what was wrong: a bad spec file exits 2 naming the field, a bad
    value names the option, a server that is not there says so."""
    runner, file_choices, state = cli
    bad = run(runner, ["deploy", file_choices[4]])
    assert bad.exit_code == 2 and "cpu_target" in bad.output and "name" in bad.output
    assert run(runner, ["deploy", file_choices[5]]).exit_code == 2
    ttl = run(runner, ["auth", "issue", "--user", "a", "--role", "viewer", "--ttl", "1e400h"])
    assert ttl.exit_code == 2 and "TTL" in ttl.output
    down = run(runner, ["deploy", file_choices[0]])
    assert down.exit_code == 1 and "hms up" in down.output
