# The commands a user types. Each sets up .venv first if it is missing or out of date.
#   make test    the whole test suite (offline, CPU)
#   make demo    every notebook, in order, on synthetic data, on CPU -> runs/demo/
#   make train   notebooks/03_train.ipynb: real CIFAR-100, the GPU's recipe or a laptop's (see below)
# Add TORCH=cpu to any of them (make test TORCH=cpu) on a machine without an NVIDIA GPU: see below.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# TORCH=cpu: torch and torchvision come from PyTorch's CPU-only wheel index, as PyTorch's install
# instructions give it, before the rest (pip's default torch on Linux is the CUDA build, whose
# libraries make .venv about 6 GB). Each choice has its own stamp, so that asking for the other
# one sets .venv up again; a .venv that already holds the CUDA build is refused (make clean first).
# Where that index cannot be reached, make says so and stops: it never falls back to another
# build, and after the install it checks that torch is the CPU build. TORCH_CPU_INDEX=URL names a
# mirror of the index.
TORCH ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifneq ($(filter-out cpu,$(TORCH)),)
$(error TORCH=$(TORCH): the one choice is TORCH=cpu; leave TORCH unset for pip's default torch)
endif
STAMP := $(VENV)/.installed$(if $(TORCH),-$(TORCH))
# torch and torchvision with the bounds requirements.txt gives them
TORCH_REQUIREMENTS := $(shell grep -E '^(torch|torchvision)([<>=!~ ;]|$$)' requirements.txt)
export PATH := $(CURDIR)/$(BIN):$(PATH)

NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
DEMO_OUT := runs/demo
# Parameters each notebook gets in the demo (papermill -p NAME VALUE), on synthetic data. The
# demo trains a small backbone from scratch at 32 px: a check that everything runs, not a result
# (the project's default stays an ImageNet ResNet-50).
DEMO_01 := -p dataset synthetic
DEMO_02 := -p dataset synthetic
DEMO_03 := -p dataset synthetic -p preset cpu -p backbone resnet18 -p weights none -p image_size 32 \
	-p epochs 3 -p run_name demo -p overwrite True -p device cpu
DEMO_04 := -p checkpoint checkpoints/demo/best.pt -p device cpu
DEMO_05 := -p checkpoint checkpoints/demo/best.pt -p demo_image notebooks/demo_image.png
# After notebook 03, a second run with the CLI (same settings, another seed) gives notebook 06 two
# runs to compare. The recipe runs with globbing off (set -f), so demo* reaches papermill as is.
DEMO_B := dataset=synthetic preset=cpu backbone=resnet18 weights=none image_size=32 epochs=3 \
	run_name=demo-b seed=1 overwrite=True device=cpu
DEMO_06 := -p runs demo* -p out_dir $(DEMO_OUT)/compare

.PHONY: venv test demo train clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed, found " + sys.version.split()[0] + "; run make PYTHON=/path/to/python3.x")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(TORCH),cpu)
	@$(BIN)/python -c 'import importlib.metadata as m, sys; sys.exit("$(VENV) holds the CUDA build of torch (its nvidia-* libraries); for the CPU-only build, run make clean first, then make again with TORCH=cpu" if any((d.metadata["Name"] or "").lower().startswith("nvidia-") for d in m.distributions()) else 0)'
	$(BIN)/python -m pip install --index-url $(TORCH_CPU_INDEX) $(foreach r,$(TORCH_REQUIREMENTS),'$(r)') || { \
		echo "make: TORCH=cpu: could not install torch's CPU-only build from $(TORCH_CPU_INDEX) (pip says why above)."; \
		echo "Nothing else was installed. Where that index cannot be reached (a proxy that lets only PyPI through,"; \
		echo "say), name a mirror of it: make TORCH=cpu TORCH_CPU_INDEX=https://your-mirror/whl/cpu. Or leave TORCH"; \
		echo "unset for pip's default torch (on Linux the CUDA build, about 6 GB; it runs on a CPU too)."; exit 1; } >&2
endif
	$(BIN)/python -m pip install -r requirements.txt -r requirements-dev.txt
ifeq ($(TORCH),cpu)
	@$(BIN)/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else f"make: TORCH=cpu, but .venv now holds torch {torch.__version__}, a CUDA build: something in requirements.txt asked pip for a torch that the CPU-only index did not give. Run make clean, then make TORCH=cpu again, or leave TORCH unset.")'
endif
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	@test -n "$(NOTEBOOKS)" || echo "no notebooks in notebooks/ yet: nothing to run"
	@set -ef; for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		case "$$(basename $$nb)" in 01*) p='$(DEMO_01)';; 02*) p='$(DEMO_02)';; 03*) p='$(DEMO_03)';; \
			04*) p='$(DEMO_04)';; 05*) p='$(DEMO_05)';; 06*) p='$(DEMO_06)';; *) p='';; esac; \
		$(BIN)/python -m cifarlib.notebook --stream --no-progress-bar "$$nb" "$(DEMO_OUT)/$$(basename $$nb)" $$p; \
		case "$$(basename $$nb)" in 03*) echo "== second run, demo-b (python -m cifarlib.train)"; \
			$(BIN)/python -m cifarlib.train $(DEMO_B);; esac; \
	done
	@echo "executed notebooks are in $(DEMO_OUT)/"

# make train PRESET=cpu EPOCHS=3 BUDGET=10 BACKBONE=tf_efficientnet_lite0 WEIGHTS=path DATASET=folder DATA_DIR=path
#            ARGS='-p lr_scale 0.5 -p seed 1'   (any other parameter of notebooks/03_train.ipynb)
# Each one given becomes that notebook parameter (BUDGET: budget_minutes); the rest keep the
# notebook's defaults. With no PRESET the notebook's preset=auto picks the device's recipe: on a
# CUDA GPU the original one; elsewhere the cpu preset with a 15-minute budget, unless EPOCHS or
# BUDGET is given. Why a budget: a first run on a laptop must end in a time it states in its
# first lines (the original recipe would run for days on a CPU, and the cpu preset's epochs take
# as long as the laptop needs); the budget counts from the command's start, as the command line's
# does. The terminal shows what the notebook prints (the choice, the device plan, the budget's
# plan with its end, a line per epoch, the run's folder, any error); the executed notebook, with
# its tables and figures, goes to runs/train-DATE.ipynb.
PRESET ?=
EPOCHS ?=
BUDGET ?=
BACKBONE ?=
WEIGHTS ?=
DATASET ?=
DATA_DIR ?=
ARGS ?=
TRAIN_PARAMS = $(if $(PRESET),-r preset '$(PRESET)') $(if $(EPOCHS),-p epochs '$(EPOCHS)') \
	$(if $(BUDGET),-p budget_minutes '$(BUDGET)') $(if $(BACKBONE),-r backbone '$(BACKBONE)') \
	$(if $(WEIGHTS),-r weights '$(WEIGHTS)') $(if $(DATASET),-r dataset '$(DATASET)') \
	$(if $(DATA_DIR),-r data_dir '$(DATA_DIR)') $(ARGS)

train: $(STAMP)
	@test -f notebooks/03_train.ipynb || { echo "notebooks/03_train.ipynb does not exist yet"; exit 1; }
	@mkdir -p runs
	@$(BIN)/python -m cifarlib.notebook --stream --no-progress-bar notebooks/03_train.ipynb \
		runs/train-$$(date +%Y%m%d-%H%M%S).ipynb $(TRAIN_PARAMS)

# make app             notebook 05 as a web page (Voila) at http://HOST:PORT/, stopped with Ctrl-C
# make app CHECKPOINT=checkpoints/RUN/best.pt HOST=0.0.0.0 PORT=8000
# make app MAX_VISITORS=8 POOL=2 CULL_IDLE=60   pages at once (empty: what the memory holds), preheated
#                      pages, and the seconds a page's kernel outlives its connection once it is gone
# make app HOST=0.0.0.0 ALLOWED_HOSTS=192.168.1.5,myhost.local   the names visitors type, which the app
#                      must answer to (it answers 127.0.0.1, localhost and HOST only: DNS rebinding)
# make app PER_CLIENT=4  pages one address may hold (loopback apart; 0: no limit; a classroom behind
#                      one router shares one address)
#                      (APP_ARGS: more options of python -m cifarlib.serve, such as --torch)
# make app-screenshot CHECKPOINT=checkpoints/RUN/best.pt  docs/app.png (at most SCREENSHOT_MAX bytes), from the
#                      browser test's runs/app.png of that model predicting photos of its own validation split
HOST ?= 127.0.0.1
PORT ?= 8866
CHECKPOINT ?=
MAX_VISITORS ?=
POOL ?= 2
CULL_IDLE ?= 60
ALLOWED_HOSTS ?=
PER_CLIENT ?= 4
APP_ARGS ?=
SCREENSHOT_MAX := 204800
.PHONY: app app-screenshot

app: $(STAMP)
	$(BIN)/python -m cifarlib.serve --host '$(HOST)' --port '$(PORT)' --checkpoint '$(CHECKPOINT)' \
		--max-visitors '$(or $(MAX_VISITORS),0)' --pool '$(POOL)' --cull-idle '$(CULL_IDLE)' \
		--allowed-hosts '$(ALLOWED_HOSTS)' --per-client '$(PER_CLIENT)' $(APP_ARGS)

app-screenshot: $(STAMP)
	@test -n "$(CHECKPOINT)" || { echo "usage: make app-screenshot CHECKPOINT=checkpoints/RUN/best.pt (the README's: checkpoints/cifar10-lite0/best.pt)"; exit 2; }
	@rm -f runs/app.png
	APP_SCREENSHOT_CHECKPOINT='$(CHECKPOINT)' CI=true $(BIN)/python -m pytest -q tests/test_app_browser.py -k real_photos
	@size=$$(wc -c < runs/app.png); test $$size -le $(SCREENSHOT_MAX) || \
		{ echo "runs/app.png is $$size bytes, over the $(SCREENSHOT_MAX) allowed for docs/app.png"; exit 1; }
	@mkdir -p docs && cp runs/app.png docs/app.png && echo "docs/app.png updated"

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_OUT)
