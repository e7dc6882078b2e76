# lbridge — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LBRIDGE := $(BIN)/lbridge
DEMO_RATIOS := 2,3,4,5
DEMO_PROMPTS := 20
DEMO_METHODS := fora,taylorseer
# Its own output root: `lbridge report` tables every evaluated run under the root it reads, and the
# demo's table should hold the demo's runs, not those of an earlier `make reproduce-tiny` or sample.
DEMO_ARGS := model=tiny num_prompts=$(DEMO_PROMPTS) output_root=outputs/demo

.PHONY: install demo learnibridge-results calibrated-results methods-results reproduce-tiny reproduce-table1 \
	reproduce-table2 reproduce-table3 test lint format tiny-model clean
.PHONY: reliability-results

# Idempotent: re-runs pip only when pyproject.toml or constraints.txt changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded tiny model: sample (with the same-seed reference), evaluate, tabulate.
demo: install
	$(LBRIDGE) sample -m method=$(DEMO_METHODS) ratio=$(DEMO_RATIOS) $(DEMO_ARGS)
	$(LBRIDGE) eval method=none $(DEMO_ARGS)
	$(LBRIDGE) eval -m method=$(DEMO_METHODS) ratio=$(DEMO_RATIOS) $(DEMO_ARGS)
	$(LBRIDGE) report model=tiny output_root=outputs/demo out=results/tiny/demo 'regenerate="make demo"'

# The LearniBridge claims on the tiny model (quality vs speed, few-shot, rank, options, low-rank
# analysis) -> results/tiny/learnibridge_*. About 10 minutes on 2 CPU cores.
learnibridge-results: install
	$(BIN)/python scripts/learnibridge_results.py
	$(LBRIDGE) analyze model=tiny ratio=1 schedule.interval=3 out=results/tiny/learnibridge_analysis

# L2P, TCC (naive and iterative, on FORA and TaylorSeer) and LearniBridge vs their bases at ratios
# 2-6 -> results/tiny/calibrated.{csv,md}, calibrated_pareto.png, tcc_iterative_vs_naive.md (~10 min).
calibrated-results: install
	$(BIN)/python scripts/calibrated_results.py

# Every training-free method at ratios 2-6 on the tiny model, one Hydra multirun per command, same 20
# prompts and seeds -> results/tiny/methods.{csv,md}. Adaptive methods first solve their threshold
# for each ratio (`lbridge calibrate`); a ratio a method cannot reach is listed with the reason. The
# leading `-` lets the sweep's table be written when some (method, ratio) jobs are unreachable.
METHODS_STATIC := fora,taylorseer,foca,toca
METHODS_ADAPTIVE := teacache,fbcache,magcache
METHODS_ROOT := outputs/methods
METHODS_ARGS := model=tiny ratio=2,3,4,5,6 num_prompts=20 output_root=$(METHODS_ROOT)
methods-results: install
	rm -f $(METHODS_ROOT)/failed_jobs.jsonl
	-$(LBRIDGE) calibrate -m method=$(METHODS_ADAPTIVE) $(METHODS_ARGS)
	$(LBRIDGE) sample model=tiny method=none num_prompts=20 output_root=$(METHODS_ROOT)
	-$(LBRIDGE) sample -m method=$(METHODS_STATIC),$(METHODS_ADAPTIVE) $(METHODS_ARGS)
	$(LBRIDGE) eval model=tiny method=none num_prompts=20 output_root=$(METHODS_ROOT)
	-$(LBRIDGE) eval -m method=$(METHODS_STATIC),$(METHODS_ADAPTIVE) $(METHODS_ARGS)
	$(LBRIDGE) report model=tiny output_root=$(METHODS_ROOT) out=results/tiny name=methods \
		'regenerate="make methods-results"'

# The paper tables (conf/table/*.yaml): every row calibrated if needed, sampled, evaluated -> results/<table>/
# table.csv|md|tex, pareto.png, grid/. They need a CUDA GPU and the weights and stop at once without
# them. DRY_RUN=1 runs the whole table on tiny random-weight pipelines of the same classes on CPU, in
# minutes, under outputs/reproduce/<table>-dry-run/ (its numbers mean nothing). ARGS go to every row,
# e.g. ARGS='overrides=["model.path=/weights/flux","prompts.path=/data/DrawBench200.txt"]'.
REPRODUCE = $(LBRIDGE) reproduce $(if $(filter 1 true yes,$(DRY_RUN)),dry_run=true)
reproduce-table1: install
	$(REPRODUCE) table=table1_flux $(ARGS)
reproduce-table2: install
	$(REPRODUCE) table=table2_hunyuan $(ARGS)
reproduce-table3: install
	$(REPRODUCE) table=table3_wan $(ARGS)

# Every implemented method at ratios 2-6 on the embedded tiny model, offline on CPU -> results/tiny/reproduce/.
reproduce-tiny: install
	$(REPRODUCE) table=tiny
# --- reliability (issue 7) ---------------------------------------------------------------------------
# Every fault and bad input through the command line, and what the user sees -> results/reliability.md
# (SIGKILL mid-run and resume, 2 gloo processes vs 1, one-line errors; ~10 minutes on 2 CPU cores).
reliability-results: install
	$(BIN)/python scripts/reliability_results.py
# --- end reliability ----------------------------------------------------------------------------------

# Speed: latency vs FLOPs speedup of every method, eager and regionally compiled, on a random-weight
# transformer of a real config -> results/speed/<device>.{csv,md} (scripts/bench_speed.py --help).
# CPU (no CUDA): the flux-medium config, every method eager and compiled, ~40 min on 2 idle cores. On a GPU:
#   make bench BENCH_ARGS="--device cuda --config flux-dev"   (also wan21-1.3b, hunyuan-video)
.PHONY: bench
BENCH_ARGS ?= --threads 1 --repeats 5
bench: install
	$(BIN)/python scripts/bench_speed.py $(BENCH_ARGS)

# The lent GPU machine (docs/gpu.md) has torch but no diffusers or Hydra, and no package registry:
# their wheels, at this venv's versions, go to .gpu-kit/, which travels with each command there.
GPU_KIT_PACKAGES := diffusers|hydra-core|omegaconf|antlr4-python3-runtime
.PHONY: gpu-kit
gpu-kit: install
	rm -rf .gpu-kit
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps -w .gpu-kit \
		$$($(BIN)/pip freeze --disable-pip-version-check | grep -iE '^($(GPU_KIT_PACKAGES))==')
	ls .gpu-kit

# Every part of scripts/gpu_run.sh, on this CPU at flux-tiny size, under the lent machine's package
# versions (its torch, transformers, peft... instead of this venv's pins) and .gpu-kit: what breaks
# there breaks here first, at no device time (~3 min, plus a ~2 GB install the first time). The
# image's python is 3.12: GPU_IMAGE_PYTHON=/path/to/python3.12 to match it too.
GPU_IMAGE_PYTHON ?= $(PYTHON)
GPU_IMAGE_PINS := torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 huggingface_hub==1.33.0 \
	peft accelerate==1.15.0 safetensors==0.8.0 torchmetrics==1.9.0 numpy pandas scikit-learn \
	scikit-image matplotlib tqdm pyyaml regex requests filelock pillow tabulate
GPU_REHEARSAL := .gpu-rehearsal
.PHONY: gpu-rehearse
gpu-rehearse: gpu-kit
	test -x $(GPU_REHEARSAL)/bin/python || $(GPU_IMAGE_PYTHON) -m venv $(GPU_REHEARSAL)
	$(GPU_REHEARSAL)/bin/pip install --quiet --disable-pip-version-check $(GPU_IMAGE_PINS)
	set -e; results=$$(mktemp -d); for part in essential check stack others bridge compiled profile profile-compiled; do \
		case $$part in profile*) args="--runs 1";; check) args="";; \
			*) args="--ratios 2 --repeats 1 --calib-prompts 1 --calib-steps 5";; esac; \
		PYTHON=$(GPU_REHEARSAL)/bin/python DEVICE=cpu CONFIG=flux-tiny RESULTS=$$results OUT=$$results/out \
			bash scripts/gpu_run.sh $$part $$args > $$results/$$part.log 2>&1 \
			|| { tail -20 $$results/$$part.log; echo "gpu-rehearse: part '$$part' failed ($$results/$$part.log)"; exit 1; }; \
		echo "$$part: ok"; done

test: install
	$(BIN)/ruff check lbridge scripts tests
	$(BIN)/python -m pytest -q -n 2

lint: install
	$(BIN)/ruff check lbridge scripts tests
	$(BIN)/ruff format --check lbridge scripts tests

format: install
	$(BIN)/ruff format lbridge scripts tests
	$(BIN)/ruff check --fix lbridge scripts tests

# Retrain the shipped assets (fixed seeds; ~1 min and ~15 min on 2 CPU cores).
tiny-model: install
	$(BIN)/python scripts/train_classifier.py
	$(BIN)/python scripts/train_tiny.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
