"""Router benchmark: the same bounded wrk load through each proxy in front of the same 3 pods,
measured in one run, against Debian's nginx (round-robin) and a hand-configured HAProxy.

Pods: one service of ``--image`` (hms-ach, Python), 3 Docker pods at ``--cpus`` (0.3) each,
deployed through our orchestrator (a Temporal dev server and a worker in this process). The two
engines run as ``python -m router`` child processes fed by the worker, like ``hms router``.

Proxies, all on 127.0.0.1, ``/<service>/`` with the prefix stripped:
  direct       wrk straight at one pod (a ceiling for one pod, no proxy)
  builtin      our builtin engine (httptools + uvloop, one process per CPU: HMS_ROUTER_PROCS)
  haproxy      our haproxy engine (HAProxy 2.6 driven through its Runtime API, weights from our score)
  nginx        Debian nginx, ``upstream`` round-robin over the 3 pods, keepalive 64, defaults otherwise
  haproxy-rr   HAProxy hand-configured: ``balance roundrobin``, ``option redispatch``, ``retries 2``

Phases (each measurement: ``wrk -t2 -c<C> -d<D>s --latency`` after a 2 s warm-up at the same load):
  base   all pods at --cpus; ``--rounds`` (3) rounds, each measuring every proxy once, each round
         starting at a different proxy. A proxy's figures are those of its median round; its ratio
         to nginx is the median of the per-round ratios (nginx measured in the same round), so
         that a load swing on a shared machine hits one round, not one proxy
  fast   the base rounds again on a second service of ``--fast-image`` (nginx inside the pod, same
         CPU limit): pods that are not the bottleneck, so each proxy's own cost shows
  slow   one pod at 0.02 CPU (``docker update --cpus 0.02``), restored afterwards
  kill   the oldest pod's main process SIGKILLed 2 s into the run; errors = non-2xx + socket
         errors. Our engines follow the heal through the feed; nginx and haproxy-rr are
         re-pointed at the current 3 pods (config rewritten, reloaded) before their run.

Latency, three figures per measurement. wrk's p50/p99/max cover completed requests only: a
request still waiting when the run ends is in no figure, so a proxy that parks its connections
behind a stalled pod shows a few fast requests and a small p99. Beside each wrk run, an open-loop
probe (``--probe-rate``, 40 req/s, about 3 % of the base load) sends a GET on schedule through the
same URL whether or not earlier ones returned, and cuts one still unanswered 0.5 s after the run
ends, counting it at the time it had waited; its p50/p99/max (">=" where an unfinished request
makes a figure a lower bound) and unfinished count are printed with wrk's, and so is the mean
latency by Little's law, connections / req/s. The slow-phase p99 verdicts use the probe's p99
(ours must be exact and below nginx's); wrk's p99 is printed beside it.

Targets (ratios to nginx in the same run): base throughput builtin >= 0.5x, haproxy >= 0.9x;
fast throughput builtin >= 0.5x, haproxy >= 1.0x;
slow: both engines >= 1.5x nginx throughput and p99 (probe) below nginx's; kill: 0 failed requests.

    .venv/bin/python bench/router.py [--duration 8] [--connections 64] [--cpus 0.3] [--rounds 3]

Prints the tables and writes bench/results/router.json. To chase a rare event, a partial run
(printed, no JSON written) repeats only some phases for some proxies, e.g. five kills through
the haproxy engine: ``--phases kill --proxies haproxy --repeat 5``. ``HMS_BENCH_RAW=1`` prints
wrk's own output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lib import EXAMPLE_IMAGE  # noqa: E402
from bench.lib.cpu import proc_cpu  # noqa: E402
from bench.lib.ports import docker_client  # noqa: E402
from bench.lib.results import Run, add_source_arg, print_table, run_main  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack  # noqa: E402
from bench.lib.stats import nearest_rank  # noqa: E402, F401 - the tests import it from here

NAME = "router"
SERVICE = "bench-router"
FAST_SERVICE = "bench-router-fast"
FAST_IMAGE = "registry.gov/hms-fast:1.0"
TARGETS = {"base_builtin": 0.5, "base_haproxy": 0.9, "slow_throughput": 1.5, "fast_builtin": 0.5, "fast_haproxy": 1.0}
PROXIES = ("builtin", "haproxy", "nginx", "haproxy-rr")
PHASES = ("base", "fast", "slow", "kill")


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's figures. They cover completed requests only: a request still unanswered when the run
    ends is in none of them (see :func:`latency_summary` for the measure that counts it)."""
    res: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = round(float(m.group(1)), 1)
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"^\s+Latency\s+(\S+)\s+\S+\s+(\S+)", out, re.M):
        res["mean_ms"], res["max_ms"] = round(_ms(m.group(1)), 2), round(_ms(m.group(2)), 2)
    for q in ("50", "90", "99"):
        if m := re.search(rf"^\s+{q}%\s+(\S+)", out, re.M):
            res[f"p{q}_ms"] = round(_ms(m.group(1)), 2)
    res["non_2xx"] = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    if sock and res["socket_errors"]:
        res["socket_errors_by_kind"] = dict(zip(("connect", "read", "write", "timeout"),
                                                (int(x) for x in sock.groups()), strict=True))
    res["errors"] = res["non_2xx"] + res["socket_errors"]
    return res


async def wrk(url: str, *, threads: int, connections: int, seconds: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "--latency", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    res = parse_wrk(out.decode())
    if os.environ.get("HMS_BENCH_RAW"):  # wrk's own output, to check the parser against
        print(out.decode(), flush=True)
    if "rps" not in res:
        raise RuntimeError(f"wrk gave no figures for {url}: {out.decode()[-500:]}")
    return res


# --- latency with unfinished requests counted ------------------------------------------------


def latency_summary(done_ms: list[float], unfinished_ms: list[float]) -> dict[str, Any]:
    """p50/p99/max over every request sent: a completed one at its latency, an unfinished one at
    the time it had waited when it was cut, which is a lower bound of its latency. Each figure is
    therefore a lower bound of the true one; ``*_exact`` says it is exact (no unfinished request
    was cut at or below it, so none can have moved past it)."""
    values = sorted(done_ms + unfinished_ms)
    out: dict[str, Any] = {"sent": len(values), "completed": len(done_ms), "unfinished": len(unfinished_ms)}
    if not values:
        return out
    shortest_cut = min(unfinished_ms, default=math.inf)
    for name, v in (("p50", nearest_rank(values, 0.5)), ("p99", nearest_rank(values, 0.99)), ("max", values[-1])):
        out[f"{name}_ms"] = round(v, 2)
        out[f"{name}_exact"] = shortest_cut > v
    return out


def littles_mean_ms(connections: int, rps: float | None) -> float | None:
    """Mean time a request spends in the system by Little's law, L = lambda W: wrk keeps
    ``connections`` requests outstanding at all times and completes ``rps`` of them a second,
    so W = connections / rps, the requests still waiting at the end included."""
    return round(connections / rps * 1000, 1) if rps else None


def get_probe(res: dict[str, Any], key: str) -> Any:
    return (res.get("probe") or {}).get(key)


def shown(summary: dict[str, Any], key: str) -> str:
    """A figure of :func:`latency_summary`, with ">=" where it is a lower bound."""
    v = summary.get(f"{key}_ms")
    return "-" if v is None else f"{'' if summary.get(f'{key}_exact') else '>='}{v:g}"


def p99_below(ours: dict[str, Any], peer: dict[str, Any]) -> bool:
    """Ours is below the peer's only if ours is exact: the peer's may be a lower bound (then the
    true one is higher still), ours may not."""
    a, b = ours.get("p99_ms"), peer.get("p99_ms")
    return a is not None and b is not None and bool(ours.get("p99_exact")) and a < b


async def probe(url: str, *, rate: float, start: float, end: float, deadline: float) -> dict[str, Any]:
    """Open loop: a GET every 1/rate s from ``start`` to ``end`` (event-loop time), each sent on
    schedule whether or not earlier ones have returned; one still unanswered at ``deadline`` is cut
    there and counted as unfinished at the time it had waited. Non-2xx/3xx and socket errors count
    as errors (at the time they took)."""
    loop = asyncio.get_running_loop()
    done: list[float] = []
    cut: list[float] = []
    late: list[float] = []
    errors = 0

    async def one(http: aiohttp.ClientSession, sent: float) -> None:
        nonlocal errors
        try:
            async with asyncio.timeout(deadline - sent):
                async with http.get(url) as r:
                    await r.read()
                    errors += r.status >= 400
        except TimeoutError:
            cut.append((deadline - sent) * 1000)
            return
        except (aiohttp.ClientError, OSError):
            errors += 1
        done.append((loop.time() - sent) * 1000)

    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as http:
        try:
            for i in range(min(int((end - start) * rate), 100_000)):
                target = start + i / rate
                await asyncio.sleep(max(0.0, target - loop.time()))
                now = loop.time()
                if now >= end:
                    break
                late.append((now - target) * 1000)
                tasks.append(asyncio.create_task(one(http, now)))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(0.0, deadline - loop.time()) + 5)
        finally:
            for t in tasks:
                t.cancel()
    return dict(latency_summary(done, cut), rate=rate, errors=errors,
                schedule_late_max_ms=round(max(late, default=0.0), 1))


async def wrk_probed(url: str, *, threads: int, connections: int, seconds: float, probe_rate: float,
                     lead_s: float = 0.5, grace_s: float = 0.5) -> dict[str, Any]:
    """wrk's run with :func:`probe` beside it through the same URL: the probe starts ``lead_s``
    after wrk (its connections are up), sends until wrk's run ends and cuts what is unanswered
    ``grace_s`` later. Adds ``probe`` and ``littles_mean_ms`` to wrk's figures."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    p = asyncio.ensure_future(probe(url, rate=probe_rate, start=t0 + lead_s, end=t0 + seconds,
                                    deadline=t0 + seconds + grace_s))
    try:
        res = await wrk(url, threads=threads, connections=connections, seconds=seconds)
        res["probe"] = await p
    finally:
        p.cancel()
    res["littles_mean_ms"] = littles_mean_ms(connections, res.get("rps"))
    return res


def line(res: dict[str, Any]) -> str:
    """One measurement, wrk's figures (completed requests only) beside the probe's."""
    pr = res.get("probe") or {}
    return (f"{res['rps']:9.1f} req/s  wrk (completed only) p50 {res.get('p50_ms')} p99 {res.get('p99_ms')} "
            f"max {res.get('max_ms')} ms, errors {res['errors']}; C/rps {res.get('littles_mean_ms')} ms; "
            f"probe p50 {shown(pr, 'p50')} p99 {shown(pr, 'p99')} max {shown(pr, 'max')} ms, "
            f"unfinished {pr.get('unfinished')}/{pr.get('sent')}, errors {pr.get('errors')}; "
            f"proxy CPU {res.get('proxy_cpu_us_per_req')} us/req"
            + (f" ({res['control_cpu_us_per_req']} ours)" if "control_cpu_us_per_req" in res else ""))


# --- peers: nginx and a hand-configured HAProxy -------------------------------------------------


class PeerProxy:
    """A peer proxy's process, with its config under ``workdir/<kind>``."""

    kind = ""

    def __init__(self, workdir: Path, port: int) -> None:
        self.dir = workdir / self.kind
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None


class Nginx(PeerProxy):
    kind = "nginx"

    def write(self, endpoints: list[str], service: str = SERVICE) -> None:
        servers = "\n".join(f"        server {e};" for e in endpoints)
        (self.dir / "nginx.conf").write_text(f"""
worker_processes auto;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream pods {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location /{service}/ {{
            proxy_pass http://pods/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")

    def start(self, endpoints: list[str]) -> None:
        self.write(endpoints)
        self.proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def reload(self, endpoints: list[str], service: str = SERVICE) -> None:
        self.write(endpoints, service)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()


class HandHAProxy(PeerProxy):
    kind = "haproxy-rr"

    def start(self, endpoints: list[str]) -> None:
        servers = "\n".join(f"    server pod{i} {e}" for i, e in enumerate(endpoints))
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(f"""global
    maxconn 4000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option redispatch
    retries 2
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend pods
backend pods
    balance roundrobin
    http-request replace-path ^/[^/]*/?(.*) /\\1
{servers}
""")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def restart(self, endpoints: list[str]) -> None:
        self.stop()
        self.start(endpoints)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()


# --- pods --------------------------------------------------------------------------------------


def containers(dclient, node: str) -> dict[str, Any]:
    """pod id -> container of the benchmark service on our node."""
    from hms_mgmt import constants

    found = dclient.containers.list(filters={"label": [f"{constants.LABEL_SERVICE}={SERVICE}",
                                                        f"{constants.LABEL_NODE}={node}"]})
    return {c.labels[constants.LABEL_POD]: c for c in found}


async def wait_table(url: str, want: set[str], timeout_s: float = 60.0, service: str = SERVICE) -> None:
    """Until the router at ``url`` has exactly ``want`` (endpoints) ready for the service."""
    deadline = time.monotonic() + timeout_s
    got: set[str] = set()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, KeyError, TypeError):
                async with http.get(f"{url}/-/table") as r:
                    t = (await r.json())["services"].get(service)
                got = {e["address"] for e in t["endpoints"] if e["state"] == "ready"} if t else set()
                if got == want and t.get("applied_version") == t["version"]:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"router {url} never had {want} (has {got})")


async def ready_endpoints(orch, n: int, timeout_s: float = 90.0, without: set[str] = frozenset(),
                          service: str = SERVICE) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = await orch.status(service)
        pods = [p for p in st.pods if p.ready and p.id not in without]
        if len(pods) == n and len(st.pods) == n:
            return pods
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{service} never had {n} ready pods")


def ratio(a: dict[str, Any], b: dict[str, Any], key: str = "rps") -> float | None:
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


BaseRatios = dict[str, tuple[float | None, list[float | None]]]  # proxy -> (median, per round) of its ratio to nginx


def paired(rounds: dict[str, list[dict[str, Any]]], proxy: str) -> tuple[float | None, list[float | None]]:
    """Throughput over nginx's in the same round, per round, and their median."""
    per_round = [ratio(a, b) for a, b in zip(rounds[proxy], rounds["nginx"], strict=True)]
    known = [x for x in per_round if x is not None]
    return (round(statistics.median(known), 3) if known else None), per_round


def judge(results: dict[str, dict[str, Any]], base_rounds: dict[str, list[dict[str, Any]]],
          fast_rounds: dict[str, list[dict[str, Any]]] | None = None,
          ) -> tuple[dict[str, Any], dict[str, bool], BaseRatios]:
    """A full run's ratios to nginx, verdicts, and base ratios per round (with their median)."""
    slow, kill = results["slow"], results["kill"]
    base_ratio = {p: paired(base_rounds, p) for p in base_rounds}
    fast_ratio = {p: paired(fast_rounds, p) for p in fast_rounds if fast_rounds[p]} if fast_rounds else {}
    ratios = {
        "base_builtin_vs_nginx": base_ratio["builtin"][0],
        "base_haproxy_vs_nginx": base_ratio["haproxy"][0],
        "base_haproxy_rr_vs_nginx": base_ratio["haproxy-rr"][0],
        "base_rounds_vs_nginx": {p: v[1] for p, v in base_ratio.items()},
        "fast_builtin_vs_nginx": fast_ratio.get("builtin", (None,))[0],
        "fast_haproxy_vs_nginx": fast_ratio.get("haproxy", (None,))[0],
        "fast_haproxy_rr_vs_nginx": fast_ratio.get("haproxy-rr", (None,))[0],
        "fast_rounds_vs_nginx": {p: v[1] for p, v in fast_ratio.items()},
        "slow_builtin_vs_nginx": ratio(slow["builtin"], slow["nginx"]),
        "slow_haproxy_vs_nginx": ratio(slow["haproxy"], slow["nginx"]),
        # wrk's p99 of completed requests only: printed and kept, not the verdict's basis
        "slow_p99_builtin_vs_nginx": ratio(slow["builtin"], slow["nginx"], "p99_ms"),
        "slow_p99_haproxy_vs_nginx": ratio(slow["haproxy"], slow["nginx"], "p99_ms"),
        # the probe's p99, unfinished requests counted: the verdicts' basis
        "slow_probe_p99_builtin_vs_nginx": ratio(slow["builtin"]["probe"], slow["nginx"]["probe"], "p99_ms"),
        "slow_probe_p99_haproxy_vs_nginx": ratio(slow["haproxy"]["probe"], slow["nginx"]["probe"], "p99_ms"),
    }
    verdicts = {
        "base_builtin >= 0.5x nginx": (ratios["base_builtin_vs_nginx"] or 0) >= TARGETS["base_builtin"],
        "base_haproxy >= 0.9x nginx": (ratios["base_haproxy_vs_nginx"] or 0) >= TARGETS["base_haproxy"],
        **({"fast_builtin >= 0.5x nginx": (ratios["fast_builtin_vs_nginx"] or 0) >= TARGETS["fast_builtin"],
            "fast_haproxy >= 1.0x nginx": (ratios["fast_haproxy_vs_nginx"] or 0) >= TARGETS["fast_haproxy"]}
           if fast_ratio else {}),
        "slow_builtin >= 1.5x nginx": (ratios["slow_builtin_vs_nginx"] or 0) >= TARGETS["slow_throughput"],
        "slow_haproxy >= 1.5x nginx": (ratios["slow_haproxy_vs_nginx"] or 0) >= TARGETS["slow_throughput"],
        "slow_builtin p99 < nginx": p99_below(slow["builtin"]["probe"], slow["nginx"]["probe"]),
        "slow_haproxy p99 < nginx": p99_below(slow["haproxy"]["probe"], slow["nginx"]["probe"]),
        "kill_builtin 0 errors": all(r["errors"] == 0 for r in kill["builtin"].get("runs", [kill["builtin"]])),
        "kill_haproxy 0 errors": all(r["errors"] == 0 for r in kill["haproxy"].get("runs", [kill["haproxy"]])),
    }
    return ratios, verdicts, base_ratio


def print_summary(results: dict[str, dict[str, Any]], base_ratio: BaseRatios, ratios: dict[str, Any],
                  verdicts: dict[str, bool], probe_rate: float) -> None:
    print()
    rows = []
    for phase in ("base", "fast", "slow", "kill"):
        for p, r in results.get(phase, {}).items():
            pr = r.get("probe") or {}
            rows.append([f"{phase} {p}", r["rps"], r.get("p50_ms"), r.get("p99_ms"), r.get("littles_mean_ms"),
                         shown(pr, "p50"), shown(pr, "p99"), f"{pr.get('unfinished')}/{pr.get('sent')}",
                         f"{r['errors']}/{pr.get('errors')}",
                         base_ratio[p][0] if phase == "base" else ratio(r, results[phase].get("nginx", {}))])
    if ratios.get("fast_rounds_vs_nginx"):
        print("  fast x nginx per round: " + "; ".join(f"{p} {v}" for p, v in ratios["fast_rounds_vs_nginx"].items()
                                                      if p != "nginx"))
    print_table(rows, ["run", "req/s", "wrk p50", "wrk p99", "C/rps ms", "probe p50", "probe p99", "unfinished",
                       "errors wrk/probe", "x nginx"])
    print(f"\n  wrk p50/p99: completed requests only. C/rps: mean latency by Little's law. probe: "
          f"{probe_rate:g} req/s open loop beside wrk, unfinished requests counted at the time they had "
          f"waited (>= marks a lower bound)")
    print("\n  base x nginx per round: " + "; ".join(f"{p} {v[1]}" for p, v in base_ratio.items() if p != "nginx"))
    print("  slow p99 x nginx: probe (the verdicts' basis) builtin "
          f"{ratios['slow_probe_p99_builtin_vs_nginx']}, haproxy {ratios['slow_probe_p99_haproxy_vs_nginx']}; "
          f"wrk, completed only: builtin {ratios['slow_p99_builtin_vs_nginx']}, "
          f"haproxy {ratios['slow_p99_haproxy_vs_nginx']}")
    print()
    for k, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}")


# --- the run ----------------------------------------------------------------------------------


def bad_args(args) -> str | None:
    """Why the arguments cannot run, or None."""
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: apt-get install wrk nginx haproxy"
    if not set(args.phases.split(",")) <= set(PHASES) or not set(args.proxies.split(",")) & set(PROXIES):
        return f"--phases takes {','.join(PHASES)}; --proxies takes {','.join(PROXIES)}"
    if not 0 < args.probe_rate <= 1000:
        return f"--probe-rate must be in (0, 1000] requests/s, not {args.probe_rate:g}"
    return None


class RouterBench:
    """The proxies in front of one 3-pod service, and the phases measured through them."""

    def __init__(self, args) -> None:
        from bench.lib import ports

        self.args = args
        self.phases = set(args.phases.split(","))
        self.proxies = [p for p in PROXIES if p in args.proxies.split(",")]
        self.ports = {p: ports.free_port() for p in PROXIES}
        self.urls = {p: f"http://127.0.0.1:{port}" for p, port in self.ports.items()}
        self.workdir = Path(tempfile.mkdtemp(prefix="hms-bench-router-"))
        self.dclient = docker_client()
        self.nginx = Nginx(self.workdir, self.ports["nginx"])
        self.hand = HandHAProxy(self.workdir, self.ports["haproxy-rr"])
        self.routers: list[Any] = []
        self.results: dict[str, dict[str, Any]] = {"base": {}, "fast": {}, "slow": {}, "kill": {}}
        self.repeats: dict[str, dict[str, list[dict[str, Any]]]] = {"slow": {}, "kill": {}}
        self.base_rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in ("direct", *PROXIES)}
        self.fast_rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in ("direct", *PROXIES)}
        self.w = {"threads": args.threads, "connections": args.connections, "seconds": args.duration,
                  "probe_rate": args.probe_rate}
        self.path = f"/{SERVICE}/"

    async def measure(self, phase: str, proxy: str, url: str, store: bool = True) -> dict[str, Any]:
        args = self.args
        await wrk(url, threads=args.threads, connections=args.connections, seconds=2)  # warm-up
        await asyncio.sleep(args.settle)
        procs = self.proxy_procs(proxy)
        cpu0, top0 = proc_cpu(procs), proc_cpu(procs[:1])
        res = await wrk_probed(url, **self.w)
        if procs and res.get("requests"):
            # The proxy's own CPU (every process of it, our control process included) per request:
            # less sensitive than req/s to what else the machine runs.
            res["proxy_cpu_us_per_req"] = round((proc_cpu(procs) - cpu0) * 1e6 / res["requests"], 1)
            if proxy == "haproxy":  # of which our control process (the first), beside HAProxy
                res["control_cpu_us_per_req"] = round((proc_cpu(procs[:1]) - top0) * 1e6 / res["requests"], 1)
        if proxy in ("builtin", "haproxy"):
            # The engine's own view right after the run: per-pod weights, latency estimates.
            with contextlib.suppress(Exception):
                async with aiohttp.ClientSession() as http, http.get(f"{self.urls[proxy]}/-/stats") as r:
                    res["router_pods"] = (await r.json())["services"][SERVICE].get("pods")
        if store:
            self.results[phase][proxy] = res
        print(f"  {phase:5s} {proxy:11s} {line(res)}", flush=True)
        await asyncio.sleep(args.settle)
        return res

    def proxy_procs(self, proxy: str) -> list[Any]:
        """The proxy's processes (the main one and its children) as psutil processes."""
        import psutil

        main = {"nginx": self.nginx.proc, "haproxy-rr": self.hand.proc,
                **{rp.engine: rp.proc for rp in self.routers}}.get(proxy)
        if main is None or main.poll() is not None:
            return []
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(main.pid)
            return [top, *top.children(recursive=True)]
        return []

    async def setup(self, stack) -> list[Any]:
        """Both engines as processes fed by the worker, the service, nginx and hand HAProxy; the pods."""
        from router.server import RouterProcess

        grant_access(stack, [self.args.image, self.args.fast_image])
        for engine in ("builtin", "haproxy"):
            rp = RouterProcess(stack.settings, port=self.ports[engine], engine=engine,
                               log_path=self.workdir / f"router-{engine}.log")
            rp.start()
            self.routers.append(rp)
        for rp in self.routers:
            await rp.wait_ready()
        spec = {"name": SERVICE, "image": self.args.image, "min_replicas": 3, "max_replicas": 3, "cpu_target": 60,
                "cpu_limit": self.args.cpus, "health_failures": 100, "drain_s": 1.0}
        await stack.orch.deploy(spec, wait=True, timeout=180)
        pods = await ready_endpoints(stack.orch, 3)
        eps = sorted(p.endpoint for p in pods)
        for engine in ("builtin", "haproxy"):
            await wait_table(self.urls[engine], set(eps))
        self.nginx.start(eps)
        self.hand.start(eps)
        await asyncio.sleep(1.0)
        return pods

    async def base(self, eps: list[str]) -> None:
        args = self.args
        if "base" not in self.phases:
            return
        print(f"== base: 3 pods of {args.image} at {args.cpus} CPU, wrk -t{args.threads} -c{args.connections} "
              f"-d{args.duration:g}s, {args.rounds} rounds")
        await self.rounds("base", eps, self.path, self.base_rounds)

    async def rounds(self, phase: str, eps: list[str], path: str, store: dict[str, list[dict[str, Any]]]) -> None:
        """Every proxy ``--rounds`` times, interleaved; the median round stands for each."""
        order = ["direct", *self.proxies]
        for r in range(self.args.rounds):
            for p in order[r % len(order):] + order[:r % len(order)]:  # each round starts elsewhere
                url = f"http://{eps[0]}/" if p == "direct" else self.urls[p] + path
                store[p].append(await self.measure(phase, p, url, store=False))
        for p, runs in [(p, runs) for p, runs in store.items() if runs]:
            self.results[phase][p] = dict(sorted(runs, key=lambda x: x["rps"])[len(runs) // 2],
                                          rounds_rps=[x["rps"] for x in runs])

    async def fast(self, stack, base_eps: list[str]) -> None:
        """The base rounds on pods that are not the bottleneck (nginx inside the pod): the
        proxy's own cost shows. The peers are pointed at them, then back at the base pods."""
        args = self.args
        if "fast" not in self.phases:
            return
        spec = {"name": FAST_SERVICE, "image": args.fast_image, "min_replicas": 3, "max_replicas": 3,
                "cpu_target": 60, "cpu_limit": args.cpus, "health_failures": 100, "drain_s": 1.0}
        await stack.orch.deploy(spec, wait=True, timeout=180)
        eps = sorted(p.endpoint for p in await ready_endpoints(stack.orch, 3, service=FAST_SERVICE))
        for engine in ("builtin", "haproxy"):
            await wait_table(self.urls[engine], set(eps), service=FAST_SERVICE)
        self.nginx.reload(eps, FAST_SERVICE)
        self.hand.restart(eps)
        print(f"== fast: 3 pods of {args.fast_image} at {args.cpus} CPU, same load, {args.rounds} rounds")
        try:
            await self.rounds("fast", eps, f"/{FAST_SERVICE}/", self.fast_rounds)
        finally:
            self.nginx.reload(base_eps)
            self.hand.restart(base_eps)
            with contextlib.suppress(Exception):
                await stack.orch.undeploy(FAST_SERVICE)

    async def slow(self, stack, slow_pod: Any) -> None:
        if "slow" not in self.phases:
            return
        ctr = containers(self.dclient, stack.settings.node)[slow_pod.id]
        print(f"== slow: pod {slow_pod.id[:8]} at 0.02 CPU")
        subprocess.run(["docker", "update", "--cpus", "0.02", ctr.id], check=True, capture_output=True)
        await asyncio.sleep(2.0)
        for p in self.proxies * self.args.repeat:
            res = await self.measure("slow", p, self.urls[p] + self.path, store=False)
            self.repeats["slow"].setdefault(p, []).append(res)
        subprocess.run(["docker", "update", "--cpus", str(self.args.cpus), ctr.id], check=True, capture_output=True)
        await asyncio.sleep(3.0)

    async def kill(self, stack) -> None:
        if "kill" not in self.phases:
            return
        print("== kill: the oldest pod SIGKILLed 2 s into each run")
        for p in self.proxies * self.args.repeat:
            await self.kill_one(stack, p)

    async def kill_one(self, stack, p: str) -> None:
        args = self.args
        pods = await ready_endpoints(stack.orch, 3)
        eps = sorted(x.endpoint for x in pods)
        if p == "nginx":
            self.nginx.reload(eps)
        elif p == "haproxy-rr":
            self.hand.restart(eps)
        else:
            await wait_table(self.urls[p], set(eps))
        victim = min(pods, key=lambda x: x.started_at.timestamp() if x.started_at else 0)
        pid = containers(self.dclient, stack.settings.node)[victim.id].attrs["State"]["Pid"]
        await wrk(self.urls[p] + self.path, threads=args.threads, connections=args.connections, seconds=2)

        async def killer() -> None:
            await asyncio.sleep(2.0)
            os.kill(pid, signal.SIGKILL)

        k = asyncio.ensure_future(killer())
        res = await wrk_probed(self.urls[p] + self.path, **self.w)
        await k
        res["killed_pod"] = victim.id
        self.repeats["kill"].setdefault(p, []).append(res)
        print(f"  kill  {p:11s} {line(res)} (wrk: non-2xx {res['non_2xx']}, socket {res['socket_errors']}"
              f"{' ' + str(res['socket_errors_by_kind']) if res['socket_errors'] else ''})", flush=True)
        await ready_endpoints(stack.orch, 3, without={victim.id})

    async def run(self) -> None:
        try:
            async with hms_stack("docker", routers=[self.urls["builtin"], self.urls["haproxy"]]) as stack:
                pods = await self.setup(stack)
                await self.base(sorted(p.endpoint for p in pods))
                await self.fast(stack, sorted(p.endpoint for p in pods))
                await self.slow(stack, pods[0])
                await self.kill(stack)
                with contextlib.suppress(Exception):
                    await stack.orch.undeploy(SERVICE)
        finally:
            self.nginx.stop()
            self.hand.stop()
            for rp in self.routers:
                rp.stop()
            self.dclient.close()
        self.pick_repeats()

    def pick_repeats(self) -> None:
        for phase, by_proxy in self.repeats.items():  # one run stands for a proxy; with --repeat, all are kept
            for p, runs in by_proxy.items():
                if phase == "slow":  # the run with the median p99, unfinished requests counted
                    pick = sorted(runs, key=lambda x: get_probe(x, "p99_ms") or 0)[len(runs) // 2]
                else:  # every failed request counts
                    pick = max(runs, key=lambda x: x["errors"])
                self.results[phase][p] = dict(pick, runs=runs) if len(runs) > 1 else pick

    def partial(self) -> bool:
        return self.phases != set(PHASES) or self.proxies != list(PROXIES)

    def print_partial(self) -> None:
        for phase, rounds in (("base", self.base_rounds), ("fast", self.fast_rounds)):
            if rounds["nginx"]:  # rounds with nginx in them: each proxy's ratio to it, per round
                print(f"\n{phase} x nginx per round: " + "; ".join(
                    f"{p} {paired(rounds, p)}" for p, runs in rounds.items() if runs and p != "nginx"))
        print("\npartial run: " + "; ".join(
            f"{phase} {p} " + ", ".join(f"{r['rps']} req/s p99 {r.get('p99_ms')} ms (wrk, completed only), "
                                       f"{shown(r['probe'], 'p99')} ms (probe, {r['probe']['unfinished']} "
                                       f"unfinished) errors {r['errors']}" for r in runs)
            for phase, by_proxy in self.repeats.items() for p, runs in by_proxy.items()) + "; no JSON written")


def payload(args, results: dict[str, Any], ratios: dict[str, Any], verdicts: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": "wrk " + f"-t{args.threads} -c{args.connections} -d{args.duration:g}s --latency",
        "probe_rate": args.probe_rate,
        "latency_note": "p50_ms/p99_ms/mean_ms/max_ms are wrk's, of completed requests only; probe.* count every "
                        "request the open-loop probe sent, unfinished ones at the time they had waited (a lower "
                        "bound, *_exact false); littles_mean_ms = connections / rps. The slow-phase p99 verdicts "
                        "use probe.p99_ms.",
        "base_rounds": args.rounds,
        "repeat": args.repeat,
        "pods": {"count": 3, "cpus": args.cpus, "image": args.image},
        "results": results,
        "ratios": ratios,
        "targets": TARGETS,
        "verdicts": verdicts,
    }


async def main(args) -> int:
    if why := bad_args(args):
        print(why, file=sys.stderr)
        return 2
    use_source(args.source)  # before the first product import
    run = Run(NAME)
    run.announce(args.source)
    bench = RouterBench(args)
    await bench.run()
    if bench.partial():
        bench.print_partial()
        return 0
    ratios, verdicts, base_ratio = judge(bench.results, bench.base_rounds, bench.fast_rounds)
    print_summary(bench.results, base_ratio, ratios, verdicts, args.probe_rate)
    run.done(payload(args, bench.results, ratios, verdicts))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement (default 8)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--cpus", type=float, default=0.3, help="CPU limit per pod (default 0.3)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="base phase: measure every proxy this many times, interleaved (default 3)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause around each measurement (default 1 s)")
    ap.add_argument("--image", default=EXAMPLE_IMAGE)
    ap.add_argument("--fast-image", default=FAST_IMAGE, help="the fast phase's pods (default %(default)s)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated; a partial run writes no JSON")
    ap.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated; a partial run writes no JSON")
    ap.add_argument("--probe-rate", type=float, default=40.0,
                    help="requests/s of the open-loop latency probe beside each wrk run (default 40)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="slow and kill phases: measure each proxy this many times (default 1)")
    add_source_arg(ap)
    return ap.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
