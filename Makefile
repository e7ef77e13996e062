# `make demo` and `make test` each set up .venv on first use (pinned versions from requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_WORKERS ?= 2

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/videolm demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
