# After: cron no more. `make run` sets everything up and runs a worker;
# `make test` runs the test suite. Both install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
AFTER  := $(BIN)/after
WORKER ?= manobi
PORT   ?= 5984
export AFTER_COUCHDB_URL ?= http://127.0.0.1:$(PORT)/

.PHONY: install install-dev install-bench run couchdb couchdb-stop push push-watch test lint bench soak clean

# What running needs; `make test` adds the dev extra, `make bench` the bench extra.
install: $(VENV)/.installed node_modules/.installed
install-dev: install $(VENV)/.installed-dev
install-bench: install $(VENV)/.installed-bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The suite runs the bench once, small, with its peers: it needs the bench extra too.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## The one command: embedded server (background), design docs, worker $(WORKER) (foreground).
run: install
	$(AFTER) couchdb --daemon --port $(PORT)
	$(AFTER) push
	$(AFTER) start $(WORKER) --foreground

couchdb: install
	$(AFTER) couchdb --port $(PORT)

couchdb-stop: install
	$(AFTER) couchdb stop

push: install
	$(AFTER) push

push-watch: install
	$(AFTER) push --watch

## The whole suite against a PouchDB Server it starts itself, or AFTER_TEST_COUCHDB_URL.
test: install-dev install-bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check after tests jobs bench soak
	$(BIN)/ruff format --check after tests jobs bench soak

bench: install-bench
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(if $(PROFILE),--profile-server)

## The soak with a nemesis (issue #31): faults while tasks run, then a check. SOAK_ARGS='--seed 1,2 --minutes 2'
soak: install
	$(BIN)/python -m soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
