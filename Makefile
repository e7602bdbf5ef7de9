# The few verbs people type. `make lint` and `make test` are what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/tyrum
export TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
export BACKPLANE_CHANNEL_PREFIX ?= tyrumtest
# Tests and benchmarks run clusters as deployed: every message on Redis encrypted (two keys: rotation).
export BACKPLANE_REDIS_KEYS ?= tyrum-test-suite-redis-key-one-0123456789,tyrum-test-suite-redis-key-two-0123456789

.PHONY: install run cluster test unit faults lint bench dist clean

$(BIN)/.installed: requirements.txt constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	touch $@

install: $(BIN)/.installed

# Single-node gateway on SQLite with the in-process layer: no services needed.
run: install
	$(BIN)/python manage.py migrate --no-input -v 0
	@echo "Admin live view: http://127.0.0.1:8000/admin/backplane/tenant/live/ (staff with backplane.view_live_events and operator access)"
	$(BIN)/python manage.py serve --host 127.0.0.1 --port 8000

# deploy/compose.yaml's topology as local processes (two edges, two relays, compaction) on this
# machine's PostgreSQL and Redis; prints the URLs, Ctrl-C stops it.
cluster: install
	$(BIN)/python deploy/local_cluster.py

# Everything: unit, integration (PostgreSQL + Redis), e2e (daphne processes), embedded smoke.
test: install
	$(BIN)/python manage.py makemigrations --check --dry-run -v 0
	SECRET_KEY=tyrum-test-suite-key DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) \
		$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

# The failure matrix alone (`make test` runs it too); its figures go to FAULTS_RESULTS.
faults: install
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) FAULTS_RESULTS=$(or $(FAULTS_RESULTS),bench/results/faults.json) \
		$(BIN)/python -m pytest tests/faults

# Lint, format and types; what mypy checks is [tool.mypy] in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check backplane tyrum
	$(BIN)/mypy

# The benchmark suite (bench/run_all.py, 11–15 minutes): needs PostgreSQL and Redis on
# 127.0.0.1 and node/npm for the Socket.IO peer; figures in bench/results, docs/performance.md.
bench: install
	$(BIN)/python bench/run_all.py

# The wheels: tyrum-backplane (the app) and tyrum-backplane-client (the peer SDK, no Django).
dist: install
	rm -rf build dist sdk/python/build
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist . sdk/python

clean:
	rm -rf $(VENV) var build dist sdk/python/build *.egg-info sdk/python/*.egg-info
