# rawproxy needs nothing but python3 at run time; the virtualenv below holds
# the development tools only (pinned in requirements-dev.txt).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test unit integration typecheck compat run check clean dist

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

## The runtime code must need nothing newer than Python 3.9.
compat: $(STAMP)
	$(VENV)/bin/vermin --target=3.9- --no-tips --violations rawproxy rawproxy.py
	@if command -v python3.9 >/dev/null 2>&1 && python3.9 -c '' 2>/dev/null; then \
		echo "python3.9 rawproxy.py --check"; python3.9 rawproxy.py --check > /dev/null; \
	else echo "python3.9 not installed: vermin's static check stands alone"; fi

## Run the proxy on the shipped config.json.
run:
	$(PYTHON) rawproxy.py

check:
	$(PYTHON) rawproxy.py --check

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .hypothesis .benchmarks dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

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
