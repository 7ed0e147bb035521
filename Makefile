# Set-up and entry points. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.11 and make are all they need).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input
# demo recipe (docs/demo_recipe.md): 16 x 64 x 64 volumes, a 4x slice autoencoder
# (latent 2 x 16 x 16 x 16), a small v-prediction LDM on latents encoded once, a few DP steps;
# the stage settings are in configs/demo_*.yaml (benchmarks/privacy_utility.py uses the same),
# the steps in tools/demo.py (each a bundle command, printed when it starts, two at a time).
# CPU, 2 cores: benchmarks/README.md lists each stage's time; `make demo` prints them at the end.
DEMO_PUBLIC_SUBJECTS ?= 40
DEMO_PRIVATE_SUBJECTS ?= 40
DEMO_TIMES ?= outputs/demo_times.tsv
# the demo starts from the shipped PUBLIC pre-trained weights (models/demo/, written by `make pretrain`,
# SHA-256 checked); DEMO_PRETRAIN=1 trains them from scratch first (docs/demo_recipe.md)
DEMO_PRETRAIN ?= 0
DEMO_WEIGHTS := $(if $(filter 1,$(DEMO_PRETRAIN)),'',models/demo)

.PHONY: install demo pretrain test test-fast clean

# The stamp depends on the requirement files, so a changed pin reinstalls.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so a second busy
# process on a 2-core machine slows the demo down by its share, not by 10-20x
demo: export OMP_WAIT_POLICY ?= PASSIVE
demo: install
	$(PY) -m tools.demo --public_subjects $(DEMO_PUBLIC_SUBJECTS) --private_subjects $(DEMO_PRIVATE_SUBJECTS) --times $(DEMO_TIMES) --pretrained $(DEMO_WEIGHTS)
	@$(PY) -m tools.summary demo
	@$(PY) -m tools.summary times $(DEMO_TIMES)
	@$(PY) -m tools.summary checks eval/public/report.json eval/report.json

# the demo's public pre-trained weights: phantom cohorts, the two public pre-training stages of the demo
# recipe, then models/demo/{autoencoder,diffusion}.pt with PROVENANCE.json (seed, data command, configs,
# wall times, commit, SHA-256); commit them whenever a network, a demo config or the phantom changes
pretrain: export OMP_WAIT_POLICY ?= PASSIVE
pretrain: install
	$(PY) -m tools.demo --pretrain_only --public_subjects $(DEMO_PUBLIC_SUBJECTS) --private_subjects $(DEMO_PRIVATE_SUBJECTS) --times outputs/pretrain_times.tsv --pretrained models/demo
	@$(PY) -m tools.summary times outputs/pretrain_times.tsv

# lint and format check first (a lint failure fails CI), then the suite
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

# the unit tests only (no bundle stage, CLI or torchrun process; tests/conftest.py marks those): a few minutes
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not stage and not distributed" tests

clean:
	rm -rf data eval outputs models/*.pt models/*.json
