# Set-up and entry points. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.11 and make are all they need).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input

.PHONY: install demo test clean

# The stamp depends on the requirement files, so a changed pin reinstalls.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m monai.bundle run --config_file configs/phantom.yaml

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf data eval outputs
