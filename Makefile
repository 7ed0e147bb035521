# Set-up and entry points. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.11 and make are all they need).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input
BUNDLE := $(PY) -m monai.bundle run
# demo sizes: small networks, 16 x 64 x 64 volumes (CPU, 2 cores: about 10 minutes in all)
DEMO_SUBJECTS ?= 40
DEMO_AE_EPOCHS ?= 25
DEMO_LDM_EPOCHS ?= 60
DEMO_DP_EPOCHS ?= 3

.PHONY: install demo test clean

# The stamp depends on the requirement files, so a changed pin reinstalls.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "== 1/5 phantom cohorts (public + private) =="
	$(BUNDLE) --config_file configs/phantom.yaml --public_subjects $(DEMO_SUBJECTS) --private_subjects $(DEMO_SUBJECTS)
	@echo "== 2/5 autoencoder pre-training on the public cohort =="
	$(BUNDLE) training --config_file "['configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']" --resume False --epochs $(DEMO_AE_EPOCHS) --lr 1e-3
	@echo "== 3/5 latent diffusion pre-training on the public cohort =="
	$(BUNDLE) training --config_file "['configs/train_diffusion.yaml','configs/small_diffusion.yaml']" --resume False --epochs $(DEMO_LDM_EPOCHS)
	@echo "== 4/5 DP fine-tuning on the private cohort (epsilon = 10) =="
	$(BUNDLE) training --config_file "['configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']" --resume False --epochs $(DEMO_DP_EPOCHS) --target_epsilon 10
	@echo "== 5/5 synthesis of a small conditioned cohort and an LVEDV sweep =="
	$(BUNDLE) inference --config_file configs/inference.yaml --attributes_csv configs/demo_requests.csv --output_dir outputs/demo --overwrite True
	$(BUNDLE) sweep --config_file configs/inference.yaml --attribute LVEDV --output_dir outputs/demo_sweep --overwrite True
	@$(PY) -m scripts.summary demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf data eval outputs models/*.pt models/*.json
