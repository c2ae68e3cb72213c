# The two commands of the README: `make demo` (main job) and `make test`. Each bootstraps
# .venv, packages and FiftyOne's database on first use (idempotent, offline-safe).
SHELL := /bin/bash
PY := .venv/bin/python
# The demo's images, first found (scripts/demo_data.py): DEMO_IMAGES, ../shared/data/cifar10_2k, a CIFAR-10
# sample fetched once into $NOLA_HOME/demo-data; with none (offline), one line says what to set, exit 2.
DEMO_IMAGES ?=
DEMO_CLASSES ?= airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck
DEMO_DESCRIPTIONS ?= $(if $(wildcard $(DEMO_DIR)/descriptions.json),--descriptions $(DEMO_DIR)/descriptions.json,)
# With no pretrained weights reachable the demo still runs, on random weights, and says so loudly.
# On a 2-core CPU the demo labels an even 1000-image subset so it finishes in minutes.
DEMO_ARGS ?= --fallback-random-init --max-samples 1000

.PHONY: setup demo demo-multilabel test test-fast test-heavy test-pretrained lint bench clean-venv

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(eval DEMO_DIR := $(shell $(PY) scripts/demo_data.py $(DEMO_IMAGES)))
	$(if $(filter 0,$(.SHELLSTATUS)),,$(error $(DEMO_DIR)))
	$(PY) -m fiftyone_nola auto-label --images $(DEMO_DIR) --classes $(DEMO_CLASSES) \
		--dataset nola-demo --gt-from-subfolders ground_truth $(DEMO_DESCRIPTIONS) $(DEMO_ARGS)

demo-multilabel: setup
	$(PY) -m fiftyone_nola auto-label-multilabel --images ../shared/data/coco256/images \
		--classes-file ../shared/data/coco256/classes.txt --dataset nola-demo-coco $(DEMO_ARGS)

test: setup
	bash scripts/run_tests.sh

# Unit tests only (tiny random models, no ../shared/data, no browser): about 2 minutes.
test-fast: setup
	bash scripts/run_tests.sh -m "not integration and not browser and not slow and not pretrained"

# The heavy tests (minutes each: real-size backbones end to end, the review panel on thousands of
# samples in the App), skipped by `make test` to keep it under 15 minutes on 2 cores.
test-heavy: setup
	NOLA_HEAVY=1 bash scripts/run_tests.sh -m heavy

# With real weights in NOLA_MODELS_DIR: the accuracy checks of tests/test_pretrained.py.
test-pretrained: setup
	NOLA_PRETRAINED=1 bash scripts/run_tests.sh -m pretrained tests/test_pretrained.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

clean-venv:
	rm -rf .venv
