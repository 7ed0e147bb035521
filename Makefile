# Set-up and entry points. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.11 and make are all they need).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input
BUNDLE := $(PY) -m monai.bundle run
# demo recipe (docs/README.md, "Demo recipe"): 16 x 64 x 64 volumes, an 8x slice autoencoder
# (latent 8 x 16 x 8 x 8), a small v-prediction LDM on latents encoded once, a few DP steps;
# the stage settings are in configs/demo_*.yaml (benchmarks/privacy_utility.py uses the same).
# CPU, 2 cores: docs/README.md lists each stage's time; `make demo` prints them at the end.
DEMO_PUBLIC_SUBJECTS ?= 40
DEMO_PRIVATE_SUBJECTS ?= 40
DEMO_TIMES ?= outputs/demo_times.tsv
DEMO_AE := "['configs/train_autoencoder.yaml','configs/small_autoencoder.yaml','configs/demo_autoencoder.yaml']"
DEMO_LDM := "['configs/train_diffusion.yaml','configs/small_diffusion.yaml','configs/demo_diffusion.yaml']"
DEMO_DP := "['configs/dp_finetune.yaml','configs/small_dp_finetune.yaml','configs/demo_dp_finetune.yaml']"
DEMO_SEG := "['configs/train_segmenter.yaml','configs/small_segmenter.yaml']"
LOGS := outputs/demo_logs
# each step through a timer (scripts/summary.py): the stage times are printed at the end
TIMED = $(PY) -m scripts.summary timed $(DEMO_TIMES)
# Two chains of steps at once, one core each: the DP stage and sampling gain little from a second
# thread (the DP stage took 38.5 s with one thread and with two), so a second job on that core
# saves its whole time. The autoencoder and diffusion stages use both cores (1.9x and 1.6x faster).
# The second job runs in the background (`&`, its output in a log); JOIN waits for it and fails
# (printing the end of its log) if either failed.
ONE := OMP_NUM_THREADS=1
JOIN = fg=$$?; wait $$!; bg=$$?; [ $$bg -eq 0 ] || { echo "background step failed (exit status $$bg); end of $(1):"; tail -n 25 $(1); }; [ $$fg -eq 0 ] && [ $$bg -eq 0 ]

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
	@mkdir -p $(dir $(DEMO_TIMES)) $(LOGS) && rm -f $(DEMO_TIMES)
	@echo "== 1/5 phantom cohorts (public + private) =="
	$(TIMED) "1/5 phantom cohorts" $(BUNDLE) --config_file configs/phantom.yaml --public_subjects $(DEMO_PUBLIC_SUBJECTS) --private_subjects $(DEMO_PRIVATE_SUBJECTS)
	@echo "== 2/5 autoencoder pre-training on the public cohort =="
	$(TIMED) "2/5 autoencoder" $(BUNDLE) training --config_file $(DEMO_AE) --resume False
	@echo "== 3/5 latent diffusion pre-training on the public cohort =="
	$(TIMED) "3/5 latent diffusion" $(BUNDLE) training --config_file $(DEMO_LDM) --resume False
	@echo "== 4/5 DP fine-tuning on the private cohort (epsilon = 10), then synthesis and an LVEDV sweep with the DP model =="
	@echo "   beside them, one core each: the evaluation's segmenter, the public model's samples and their evaluation (log $(LOGS)/public_model.log)"
	( export $(ONE); \
	  $(TIMED) "6/6 segmenter (beside 4-5)" $(BUNDLE) training --config_file $(DEMO_SEG) && \
	  $(TIMED) "6/6 synthesis (public model, beside 4-5)" $(BUNDLE) inference --config_file configs/inference.yaml --model_path models/diffusion.pt --attributes_csv configs/demo_requests.csv --output_dir outputs/demo_public --overwrite True --progress False && \
	  $(TIMED) "6/6 evaluation (public model, beside 4-5)" $(BUNDLE) evaluating --config_file configs/evaluate.yaml --synthetic_dir outputs/demo_public --model_path models/diffusion.pt --audit_privacy False --output_dir eval/public ) > $(LOGS)/public_model.log 2>&1 & \
	export $(ONE); \
	$(TIMED) "4/5 DP fine-tuning" $(BUNDLE) training --config_file $(DEMO_DP) --resume False && \
	$(TIMED) "5/5 synthesis" $(BUNDLE) inference --config_file configs/inference.yaml --attributes_csv configs/demo_requests.csv --output_dir outputs/demo --overwrite True && \
	$(TIMED) "5/5 LVEDV sweep" $(BUNDLE) sweep --config_file configs/inference.yaml --attribute LVEDV --output_dir outputs/demo_sweep --overwrite True; \
	$(call JOIN,$(LOGS)/public_model.log)
	@$(PY) -m scripts.summary demo
	@echo "== 6/6 evaluation of the DP model's samples and sweep (the public model's: eval/public/report.md) =="
	$(TIMED) "6/6 evaluation (DP model)" $(BUNDLE) evaluating --config_file configs/evaluate.yaml --synthetic_dir outputs/demo --sweep_dir outputs/demo_sweep
	@$(PY) -m scripts.summary times $(DEMO_TIMES)
	@$(PY) -m scripts.summary checks eval/public/report.json eval/report.json

# lint and format check first (a lint failure fails CI), then the suite
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

clean:
	rm -rf data eval outputs models/*.pt models/*.json
