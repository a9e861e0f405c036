# rawproxy needs nothing but python3 at run time; the virtualenv below holds
# the development tools only (pinned in requirements-dev.txt).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test unit integration typecheck compat run check clean probe dist soak bench bench-micro bench-ceilings bench-logcost bench-syscalls bench-hotspots bench-fairness screenshot fleet bench-fleet bench-upgrade bench-balance bench-autostart

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

## Everything CI runs: the whole test suite, mypy --strict, the 3.9 floor.
test: $(STAMP)
	$(VPY) -m pytest -n 2 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory typecheck compat

unit: $(STAMP)
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(VPY) -m pytest tests/integration $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(VPY) -m mypy --strict
	# mypy sees rawproxy.py as a duplicate of the package: check it by running it.
	$(PYTHON) rawproxy.py --check > /dev/null

## The runtime code must need nothing newer than Python 3.9: vermin reads it,
## and where a 3.9 interpreter exists (pyenv's, say) it imports and runs it.
PY39 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) \
                   $(shell command -v python3.9 2>/dev/null))
compat: $(STAMP)
	$(VENV)/bin/vermin --target=3.9- --no-tips --violations rawproxy probe rawproxy.py
	@if [ -n "$(PY39)" ] && "$(PY39)" -c '' 2>/dev/null; then \
		echo "$(PY39): import every module, run --check"; \
		"$(PY39)" -c 'import pkgutil, importlib, rawproxy, probe; [importlib.import_module(m.name) for p in (rawproxy, probe) for m in pkgutil.iter_modules(p.__path__, p.__name__ + ".") if not m.name.endswith("__main__")]' && \
		"$(PY39)" rawproxy.py --check > /dev/null; \
	else echo "no python3.9 here: vermin's static check stands alone"; fi

## Clients of every kind against backends killed and restarted at random;
## checks the proxy loses nothing and leaks nothing, prints a table.
SOAK_SECONDS ?= 60
soak: $(STAMP)
	$(VPY) -m tests.soak.soak --duration $(SOAK_SECONDS)

## The benchmark (benchmarks/run.py): rawproxy against direct, HAProxy, nginx
## stream, an asyncio and a uvloop proxy; proxies on CPU 0, load on CPU 1.
## Installs the peers and load generators with apt where it can (root, apt
## present), uvloop with pip where it can; whatever is missing is skipped
## with a note.  BENCH_ARGS='--quick' for a smoke run; see --help.
BENCH_APT  := haproxy nginx libnginx-mod-stream iperf3 redis-server redis-tools wrk
BENCH_ARGS ?=
bench: $(STAMP)
	@if command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
		missing=""; for pkg in $(BENCH_APT); do \
			dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" \
				|| missing="$$missing $$pkg"; done; \
		if [ -n "$$missing" ]; then \
			echo "apt-get install -y$$missing"; \
			{ DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
			  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }; } \
			  >/dev/null 2>&1 || echo "apt-get failed: peers without their program are skipped"; \
		fi; \
	fi
	@$(VPY) -c 'import uvloop' 2>/dev/null \
		|| $(VPY) -m pip install --quiet --disable-pip-version-check uvloop >/dev/null 2>&1 \
		|| echo "uvloop not installable: its row is skipped"
	$(VPY) -m benchmarks.run $(BENCH_ARGS)

## What the table does not show: failover to a refused or silent target,
## and name lookups queueing on the resolver's two threads (no real query).
bench-ceilings: $(STAMP)
	$(VPY) -m benchmarks.ceilings

## What one access-log line costs: rawproxy's log sink against a StreamHandler.
bench-logcost: $(STAMP)
	$(VPY) -m benchmarks.logcost

## System calls per connection (strace -c -f over connect/echo/close cycles),
## rawproxy against HAProxy where it is installed.
bench-syscalls: $(STAMP)
	$(VPY) -m benchmarks.syscalls $(BENCH_ARGS)

## Where rawproxy's CPU goes per connection and per request (cProfile, and the garbage collector).
bench-hotspots: $(STAMP)
	$(VPY) -m benchmarks.hotspots --workload churn $(BENCH_ARGS)
	$(VPY) -m benchmarks.hotspots --workload reqresp --units 20000 $(BENCH_ARGS)

## Autostart (SPEC 10): a client's time to first byte when its app's machine
## is stopped and boots in 0, 100 or 500 ms, and what the proxy adds to that.
bench-autostart: $(STAMP)
	$(VPY) -m benchmarks.autostart

## Balance "random" against "least-connections" with one target 5x slower:
## requests/s, p50/p99 latency and each target's share (BALANCE_ARGS='--rounds 5').
BALANCE_ARGS ?=
bench-balance: $(STAMP)
	$(VPY) -m benchmarks.balance $(BALANCE_ARGS)

## An upgrade in place (SIGUSR2) against a SIGTERM and restart, under churn:
## refused, reset and connect latency around the event (benchmarks/upgrade.py).
UPGRADE_ARGS ?=
bench-upgrade: $(STAMP)
	$(VPY) -m benchmarks.upgrade $(UPGRADE_ARGS)

## Does trouble on one app slow another? App B's echo p99 while app A takes a
## flood from one address (reset by PerClient) or one bulk connection.
## FAIRNESS_ARGS='--seconds 2 --rounds 1' for a quick run; see --help.
FAIRNESS_ARGS ?=
bench-fairness: $(STAMP)
	$(VPY) -m benchmarks.fairness $(FAIRNESS_ARGS)

## Micro benchmarks of the hot paths (skipped in `make test`).
bench-micro: $(STAMP)
	$(VPY) -m pytest tests/benchmarks --benchmark-enable -p no:xdist $(PYTEST_ARGS)

## Run the proxy on the shipped config.json.
run:
	$(PYTHON) rawproxy.py

check:
	$(PYTHON) rawproxy.py --check

## Prove it works: local echo backends, the proxy on them, the probe through it.
probe:
	$(PYTHON) -m probe --local --config config.json --down bad.target.for.testing:6003

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .hypothesis .benchmarks dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

## A fleet fed by etcd, on loopback: a 3-member etcd cluster (apt-get install
## etcd-server), 3 rawproxy instances, the probe through each; then a config
## change, the etcd leader killed, a registered target whose lease runs out.
fleet:
	$(PYTHON) -m benchmarks.fleet_demo

## Convergence of 10, 25, 50 instances fed by a 3-member etcd, and the cost of
## an idle watcher (benchmarks/fleet.py; FLEET_ARGS='--sizes 10 --puts 3').
FLEET_ARGS ?=
bench-fleet:
	$(PYTHON) -m benchmarks.fleet $(FLEET_ARGS)

## A single-file build: python3 dist/rawproxy.pyz [options] runs the same proxy.
DIST_DIR ?= dist
dist:
	rm -rf $(DIST_DIR)/.pyz-build && mkdir -p $(DIST_DIR)/.pyz-build
	cp -R rawproxy $(DIST_DIR)/.pyz-build/rawproxy
	find $(DIST_DIR)/.pyz-build -name __pycache__ -type d -prune -exec rm -rf {} +
	$(PYTHON) -m zipapp $(DIST_DIR)/.pyz-build -m rawproxy.cli:main \
		-p '/usr/bin/env python3' -o $(DIST_DIR)/rawproxy.pyz
	rm -rf $(DIST_DIR)/.pyz-build
	@echo "built $(DIST_DIR)/rawproxy.pyz"

## The status page pictures in README (docs/status-page*.png): local backends,
## the proxy with traffic, headless Chromium (apt-get install chromium
## chromium-driver) on its admin endpoint, a wide window and a phone.
screenshot: $(STAMP)
	$(VPY) -m tests.screenshot --out docs
