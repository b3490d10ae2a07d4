# hms-mgmt: everything runs from ./.venv; nothing is installed globally.
#
#   make demo    venv + images, then the whole stack and the three example services (Ctrl-C stops it)
#   make test    venv + images, then the test suite (PYTEST_ARGS="-k cli -x" to narrow it)
#   make chaos   the chaos and fuzz suites at full size (HMS_CHAOS_SEED=N replays a chaos run)
#   make fuzz    the fuzz tests at 10,000 examples each (HMS_FUZZ_EXAMPLES=N to change)
#   make histories  record the workflow histories tests/replay/ replays (after a patched change)
#   make bench   the benchmarks in bench/ (BENCH="deploy heal" to choose), then BENCHMARKS.md
#   make bench-budget  a short deploy benchmark; fails if a control step's median grew > 50 % over bench/budget.json
#   make soak    100 services x 2 pods for 10 min under one worker (SOAK_ARGS=--quick: 1 min;
#                SOAK_ARGS='--services 500 --kills 40' or '--ramp 100,200,300,500')
#   make lint    ruff
#   make clean   stop the demo's leftover pods and remove var/ (keeps var/cache, the base image rootfs)

SHELL := bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VAR := $(CURDIR)/var

PYTEST_ARGS ?=
TEST_WORKERS ?= 2
DEMO_ARGS ?=
BENCH ?= deploy heal scale router rollout
BENCH_ARGS ?=
SOAK_ARGS ?=
SCENARIOS ?=

.PHONY: help venv images demo up test chaos fuzz histories bench bench-budget soak report lint clean distclean

help:
	@sed -n '3,13s/^# \{0,1\}//p' Makefile

venv: $(STAMP)

# Re-installs when pyproject.toml changes (new dependency, new console script).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# Exits 0 without Docker (the process runtime needs no images) unless HMS_REQUIRE_DOCKER=1.
images:
	bash scripts/build_images.sh

demo: venv images
	HMS_STATE_DIR=$(VAR) $(BIN)/hms demo $(DEMO_ARGS)

# The stack without the example services, for your own deploys.
up: venv images
	HMS_STATE_DIR=$(VAR) $(BIN)/hms up

# Two parts: most tests on TEST_WORKERS processes (pytest-xdist, one test file per process at a
# time), then the CPU- and timing-sensitive ones (marked `serial`) alone. Exit code 5 ("no tests
# collected", e.g. PYTEST_ARGS names a file with no serial test) is not a failure.
test: venv images
	@set -e; \
	ok() { rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc; }; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 -m "not serial" $(PYTEST_ARGS) || ok; \
	$(BIN)/python -m pytest -p no:xdist -m serial $(PYTEST_ARGS) || ok

# tests/chaos at full counts (20 worker SIGKILLs per runtime, the Docker daemon restarted, 50 pod
# kills under load) and tests/fuzz with hypothesis' long profile; `make test` runs short versions.
chaos: venv images
	HMS_CHAOS=full HYPOTHESIS_PROFILE=chaos $(BIN)/python -m pytest $(wildcard tests/chaos tests/fuzz) $(PYTEST_ARGS)

# tests/fuzz/ with the chaos profile: a fresh seed and 10,000 examples per test (the signal and
# update fuzzer, one Temporal CLI call per example, 1,000). `make test` runs a few hundred, seeded.
fuzz: venv
	HYPOTHESIS_PROFILE=chaos $(BIN)/python -m pytest tests/fuzz $(PYTEST_ARGS)

histories: venv
	$(BIN)/python scripts/record_histories.py $(SCENARIOS)

bench: venv images
	@set -e; for b in $(BENCH); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py $(BENCH_ARGS); done
	$(BIN)/python bench/report.py

# Not in `make test`: the control steps' medians (from the workflow histories) against the budget
# recorded on this machine (`bench/budget.py record` after a deploy run records a new one).
bench-budget: venv images
	$(BIN)/python bench/deploy.py --runs 3 $(BENCH_ARGS)
	$(BIN)/python bench/budget.py check

# Not in BENCH: about 15 minutes (deploy 100 services, a 600 s window, undeploy). Process pods only.
soak: venv
	$(BIN)/python bench/soak.py $(SOAK_ARGS)
	$(BIN)/python bench/report.py

# BENCHMARKS.md from the latest bench/results/*.json, without running anything.
report: venv
	$(BIN)/python bench/report.py

lint: venv
	$(BIN)/ruff check .

# Pods outlive the worker by design (a process pod has its own session, a container is a
# container), so a demo killed with SIGKILL can leave some: stop those recorded for var/.
define CLEAN_PODS
import os
from pathlib import Path
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.runtimes.docker import docker_available
from hms_mgmt.config import Settings

var = Path(os.environ["VAR"])
nodes = sorted(p.name for p in (var / "pods").glob("*") if p.is_dir())
runtimes = [make_runtime("process", node=n, state_dir=var) for n in nodes]
if docker_available():
    node = Settings.from_env(env={**os.environ, "HMS_STATE_DIR": str(var)}).node
    runtimes.append(make_runtime("docker", node=node, state_dir=var))
for rt in runtimes:
    for pod in rt.list():
        rt.stop(pod.pod_id, 2)
        print(f"stopped {rt.name} pod {pod.service}/{pod.pod_id} on node {rt.node}")
    rt.close()
# A dev server left by a killed demo runs in its own session; only the one using var/'s database.
import psutil
db = str(var / "temporal.db")
for proc in psutil.process_iter(["cmdline"]):
    cmd = proc.info["cmdline"] or []
    if "start-dev" in cmd and db in cmd:
        proc.terminate()
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()
        print(f"stopped the Temporal dev server (pid {proc.pid}) of {var}")
endef
export CLEAN_PODS

clean:
	@if [ -x $(BIN)/python ] && [ -d $(VAR) ]; then VAR=$(VAR) $(BIN)/python -c "$$CLEAN_PODS"; fi
	@if [ -d $(VAR) ]; then find $(VAR) -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} +; fi
	rm -rf .pytest_cache .ruff_cache

# Also the venv and the debootstrapped base rootfs (the next `make images` rebuilds it: ~1 min).
distclean: clean
	rm -rf --one-file-system $(VENV) $(VAR) *.egg-info
