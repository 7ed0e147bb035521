# Set-up and entry points. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.11 and make are all they need).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input
BUNDLE := $(PY) -m monai.bundle run
# demo recipe (docs/README.md, "Demo recipe"): 16 x 64 x 64 volumes, an 8x slice autoencoder
# (latent 8 x 16 x 8 x 8), a small v-prediction LDM on latents encoded once, a few DP steps.
# CPU, 2 cores: docs/README.md lists each stage's time; `make demo` prints them at the end.
DEMO_PUBLIC_SUBJECTS ?= 40
DEMO_PRIVATE_SUBJECTS ?= 40
DEMO_AE_EPOCHS ?= 9
DEMO_LDM_EPOCHS ?= 12
DEMO_LDM_PASSES ?= 10
DEMO_DP_EPOCHS ?= 4
DEMO_TIMES ?= outputs/demo_times.tsv
DEMO_AE_ARGS := --network_def\#channels "[8,16,32,32]" --network_def\#attention_levels "[False,False,False,False]" \
	--network_def\#latent_channels 8 --batch_size 2 --lr 2e-3
DEMO_LDM_ARGS := --latent_shape "[8,16,8,8]" --prediction_type v_prediction --batch_size 16 --lr 2e-3
DEMO_DP_ARGS := --logical_batch_size 14
# each step through a timer (scripts/summary.py): the stage times are printed at the end
TIMED = $(PY) -m scripts.summary timed $(DEMO_TIMES)

.PHONY: install demo test clean

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
	@mkdir -p $(dir $(DEMO_TIMES)) && rm -f $(DEMO_TIMES)
	@echo "== 1/5 phantom cohorts (public + private) =="
	$(TIMED) "1/5 phantom cohorts" $(BUNDLE) --config_file configs/phantom.yaml --public_subjects $(DEMO_PUBLIC_SUBJECTS) --private_subjects $(DEMO_PRIVATE_SUBJECTS)
	@echo "== 2/5 autoencoder pre-training on the public cohort =="
	$(TIMED) "2/5 autoencoder" $(BUNDLE) training --config_file "['configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']" --resume False --epochs $(DEMO_AE_EPOCHS) $(DEMO_AE_ARGS)
	@echo "== 3/5 latent diffusion pre-training on the public cohort =="
	$(TIMED) "3/5 latent diffusion" $(BUNDLE) training --config_file "['configs/train_diffusion.yaml','configs/small_diffusion.yaml']" --resume False --epochs $(DEMO_LDM_EPOCHS) --passes_per_epoch $(DEMO_LDM_PASSES) $(DEMO_LDM_ARGS)
	@echo "== 4/5 DP fine-tuning on the private cohort (epsilon = 10) =="
	$(TIMED) "4/5 DP fine-tuning" $(BUNDLE) training --config_file "['configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']" --resume False --epochs $(DEMO_DP_EPOCHS) --target_epsilon 10 $(DEMO_DP_ARGS)
	@echo "== 5/5 synthesis of a small conditioned cohort and an LVEDV sweep =="
	$(TIMED) "5/5 synthesis" $(BUNDLE) inference --config_file configs/inference.yaml --attributes_csv configs/demo_requests.csv --output_dir outputs/demo --overwrite True
	$(TIMED) "5/5 LVEDV sweep" $(BUNDLE) sweep --config_file configs/inference.yaml --attribute LVEDV --output_dir outputs/demo_sweep --overwrite True
	@$(PY) -m scripts.summary demo
	@echo "== 6/6 evaluation: segmenter on the public cohort, then the DP model's samples and sweep =="
	$(TIMED) "6/6 segmenter" $(BUNDLE) training --config_file "['configs/train_segmenter.yaml','configs/small_segmenter.yaml']"
	$(TIMED) "6/6 evaluation" $(BUNDLE) evaluating --config_file configs/evaluate.yaml --synthetic_dir outputs/demo --sweep_dir outputs/demo_sweep
	@$(PY) -m scripts.summary times $(DEMO_TIMES)

# lint and format check first (a lint failure fails CI), then the suite
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

clean:
	rm -rf data eval outputs models/*.pt models/*.json
