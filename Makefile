# One command per chore. `make run` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench bench-quick lint setup clean compose-check

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

# The image core's compiled loops (setup.py): built by the install above, and again
# here whenever their source changes in a checkout that is already set up.
KERNELS := istasks/core/.kernels-built

$(KERNELS): $(STAMP) setup.py istasks/core/_kernels.pyx
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(STAMP) $(KERNELS)

run: setup
	$(VENV)/bin/isctl up

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# `make bench BENCH_ARGS="e2e read"` runs a subset; bench-quick runs the headline targets
# of issues 2-4 in a few minutes (the full run also does prefetch and load).
BENCH_QUICK ?= read pipeline e2e identities_e2e

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m bench $(BENCH_QUICK)

lint: setup
	$(VENV)/bin/ruff check istasks bridge queues ops tests bench
	$(VENV)/bin/ruff format --check istasks bridge queues ops tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# compose.yaml for real (root, a container engine, several minutes; not part of `make
# test`): engine and Compose tool from Debian if missing, base images from the Debian
# mirror if missing, then tests/test_compose_stack.py builds, starts, replays the
# compatibility kit through the published loopback port and tears everything down.
compose-check: $(STAMP)
	bash scripts/compose-engine.sh
	bash scripts/compose-base.sh
	IS_COMPOSE_CHECK=1 $(PY) -m pytest -p no:cacheprovider -rA -s tests/test_compose_stack.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
