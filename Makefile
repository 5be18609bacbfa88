# hmacfs: `make run` starts a local server, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRIAL := $(VENV)/bin/trial
STAMP := $(VENV)/.installed
# `make test` also runs the fast suite on the oldest Twisted pyproject.toml allows (the
# newest comes with .venv), in its own virtualenv: hmacfs uses Twisted internals that
# tests/test_twisted_internals.py pins on both.
TWISTED_OLDEST := 24.11.0
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed
# The real S3 server of the tests (tests/s3_server.py): OpenStack Swift with s3api, in its own
# virtualenv (it pins its own dependencies and pulls in eventlet: never in the project's).
SWIFT_VENV ?= .venv-swift
SWIFT_STAMP := $(SWIFT_VENV)/.installed
export HMACFS_SWIFT_PYTHON ?= $(CURDIR)/$(SWIFT_VENV)/bin/python
# The slow suites start real servers (twistd, redis-server, nginx, Swift); `make test-fast` skips them.
SLOW_TESTS := tests.test_s3_client tests.test_s3_daemon tests.test_integration tests.test_workers tests.test_operations tests.test_nginx tests.test_prosody tests.test_ejabberd tests.test_resume_integration tests.test_state tests.test_bans_redis tests.test_retention_redis
FAST_TESTS := $(filter-out $(SLOW_TESTS),$(basename $(subst /,.,$(wildcard tests/test_*.py))))

.PHONY: run test test-fast test-slow test-twisted-oldest bench bench-peers lint clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q -e '.[test]' 'twisted[tls]==$(TWISTED_OLDEST)' --config-settings editable_mode=compat
	touch $(OLDEST_STAMP)

$(SWIFT_STAMP):
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/python -m pip install -q --upgrade pip
	$(SWIFT_VENV)/bin/python -m pip install -q 'swift==2.38.3'
	touch $(SWIFT_STAMP)

run: $(STAMP)
	@$(PY) -m hmacfs.service.cli demo --config config.local.toml
	@mkdir -p data
	exec $(VENV)/bin/twistd --nodaemon --pidfile= hmacfs --config config.local.toml

system-deps:
	./scripts/install-system-deps.sh

test: lint $(OLDEST_STAMP) $(SWIFT_STAMP) system-deps
	$(OLDEST_VENV)/bin/trial --jobs=2 $(FAST_TESTS)
	$(TRIAL) --jobs=2 tests

# ruff and mypy, configured in pyproject.toml; `make test` runs this first and stops on its errors.
# Both run even when the first fails; the last line says which failed (.ci/run looks for it).
LINT_PATHS := hmacfs tests bench twisted/plugins
lint: $(STAMP)
	@status=0; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || { status=1; failed="ruff"; }; \
	$(VENV)/bin/mypy || { status=1; failed="$${failed:+$$failed and }mypy"; }; \
	if [ $$status -ne 0 ]; then echo "lint failed: $$failed found errors (make lint)"; fi; \
	exit $$status

test-twisted-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/trial --jobs=2 $(FAST_TESTS)

test-fast: $(STAMP)
	$(TRIAL) --jobs=2 $(FAST_TESTS)

test-slow: $(STAMP) $(SWIFT_STAMP) system-deps
	$(TRIAL) $(SLOW_TESTS)

bench: $(STAMP) $(SWIFT_STAMP) system-deps
	$(PY) bench/bench.py --venv $(VENV)

# prosody-filer (Go), an optional peer of `make bench`: its source and build script are not
# part of this repository (set PEERS to where they are); the binary goes to bench-out/peers/,
# which is not committed. Needs: apt-get install golang-go golang-github-burntsushi-toml-dev
PEERS ?= $(CURDIR)/../shared/peers
bench-peers:
	@test -f $(PEERS)/build-prosody-filer.sh || { echo "no $(PEERS)/build-prosody-filer.sh: set PEERS=DIR"; exit 1; }
	bash $(PEERS)/build-prosody-filer.sh $(CURDIR)/bench-out/peers

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(SWIFT_VENV) _trial_temp* build *.egg-info bench-out
