# hmacfs: `make run` starts a local server, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRIAL := $(VENV)/bin/trial
STAMP := $(VENV)/.installed
# The slow suites start real servers (twistd, redis-server, nginx); `make test-fast` skips them.
SLOW_TESTS := tests.test_integration tests.test_workers tests.test_operations tests.test_nginx tests.test_prosody tests.test_ejabberd tests.test_resume_integration tests.test_state tests.test_bans_redis tests.test_retention_redis
FAST_TESTS := $(filter-out $(SLOW_TESTS),$(basename $(subst /,.,$(wildcard tests/test_*.py))))

.PHONY: run test test-fast test-slow bench lint clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	@$(PY) -m hmacfs.cli demo --config config.local.toml
	@mkdir -p data
	exec $(VENV)/bin/twistd --nodaemon --pidfile= hmacfs --config config.local.toml

system-deps:
	./scripts/install-system-deps.sh

test: $(STAMP) system-deps
	$(TRIAL) --jobs=2 tests

test-fast: $(STAMP)
	$(TRIAL) --jobs=2 $(FAST_TESTS)

test-slow: $(STAMP) system-deps
	$(TRIAL) $(SLOW_TESTS)

bench: $(STAMP) system-deps
	$(PY) bench/bench.py --venv $(VENV)

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info bench-out
