# One-word targets; the README and CI use these. Each target does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c requirements/constraints.txt

.PHONY: run test check fuzz proto bench soak demo lesson clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[server,dev,plot]'
	touch $(STAMP)

run: $(STAMP)  ## serve the embedded default model (random:gpt2 unless --model says otherwise)
	$(VENV)/bin/gpt2-serve $(ARGS)

demo: $(STAMP)  ## stream one generation from the embedded default model to the terminal
	$(VENV)/bin/gpt2-demo $(ARGS)

test: $(STAMP)  ## the default test suite: CPU only, offline
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(STAMP)  ## lint, format check, strict typing, import rules, and promtool on a live /metrics scrape
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo --no-cache
	$(PY) tools/check_metrics.py

FUZZ_EXAMPLES ?= 3000
DETERMINISM_SCENARIOS ?= 200
fuzz: $(STAMP)  ## minutes of property-based fuzzing of every RPC, the hostile-request suite (FUZZ_EXAMPLES per test), and the determinism property over DETERMINISM_SCENARIOS random scenarios per weight format
	GPT2_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) GPT2_DETERMINISM_SCENARIOS=$(DETERMINISM_SCENARIOS) $(PY) -m pytest -p no:cacheprovider tests/test_fuzz.py tests/test_adversarial.py tests/test_determinism.py $(PYTEST_ARGS)

lesson: $(STAMP)  ## rerun docs/lesson.md's commands against gpt2-serve --model random:gpt2 and write their output (and pictures) into it; LESSON_ARGS=--check only compares
	$(PY) tools/lesson.py $(LESSON_ARGS)

proto: $(STAMP)  ## regenerate client/gpt2_client/proto/ from proto/gpt2/v1/*.proto (tests fail when it is stale)
	$(PY) proto/generate_python.py

BENCH_ARGS ?=
bench: $(STAMP)  ## every performance number in one run (bench/bench.py; BENCH_ARGS=--quick: < 5 minutes); JSON, plots, report
	$(PY) bench/bench.py $(BENCH_ARGS)

SOAK_ARGS ?=
soak: $(STAMP)  ## mixed gRPC traffic against gpt2-serve for 30 minutes (bench/soak.py; SOAK_ARGS="--minutes 8"): fails if RSS grows >= 1 MB/minute after warm-up
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
