# Two commands on a fresh machine (Python 3.11 + make): `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit bench bench-micro bench-quick clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunneld demo

lint: $(STAMP)
	$(VENV)/bin/ruff check protocol relay agent tunneld tests bench
	$(VENV)/bin/ruff format --check protocol relay agent tunneld tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy protocol relay agent tunneld

unit: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term --cov-report=html:.coverage-html -p no:cacheprovider -q

test: lint typecheck unit

bench-micro: $(STAMP)
	$(PY) -m pytest bench/micro --benchmark-only --benchmark-columns=mean,median,ops -q -p no:cacheprovider -o testpaths=bench

# End to end (nginx + wrk from Debian; installed with apt-get when missing and run as root).
bench: bench-micro
	$(PY) -m pip install -q -e '.[bench]'
	BENCH_INSTALL=1 $(PY) -m bench.e2e

bench-quick: $(STAMP)
	BENCH_INSTALL=1 $(PY) -m bench.e2e --quick --tag quick

clean:
	rm -rf $(VENV) .coverage .coverage-html .mypy_cache .ruff_cache .pytest_cache .benchmarks

# Mutation testing (not CI: slow). mutmut mutates protocol/frames.py and protocol/session.py and
# runs the protocol unit tests against each mutant ([tool.mutmut] in pyproject.toml). Results stay
# in mutants/: `$(VENV)/bin/mutmut results` lists the survivors, `mutmut show NAME` shows one.
# The last score and the triage of the survivors are in docs/testing.md. Niced: machines are shared.
.PHONY: mutation
MUTATION_JOBS ?= 1
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS)
	$(VENV)/bin/mutmut results
