# Two commands on a fresh machine (Python >= 3.11 + make): `make demo` and `make test`.
# $(VENV) is created with PYTHON: by default the newest python3.X (X >= 11) on PATH that runs, else
# python3 when it is >= 3.11 (tools/find_python.sh; `make print-python` shows the pick). A working
# $(VENV) is reused as it is: to switch interpreters, `make clean` first or pick another VENV=.
PYTHON ?=
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FIND_PYTHON := $(SHELL) tools/find_python.sh

.PHONY: setup demo test lint typecheck unit bench bench-micro bench-quick clean print-python test-versions ensure-test-tools ensure-redis ensure-tinyproxy ensure-chromium ensure-nginx ensure-bench-tools

# The install compiles tunneld/_speedups.c (setup.py; optional: without a C compiler or the
# interpreter's Python.h it installs the pure-Python code, and tests/test_speedups.py fails, so CI
# always tests the C path). Missing ones are installed with apt-get when run as root (Python.h:
# python3-dev, for Debian's own python3; pyenv's and python.org's builds ship it).
$(STAMP): pyproject.toml setup.py tunneld/_speedups.c
	@if $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	    echo "$(VENV): reusing it ($$($(PY) -V))$(if $(PYTHON), - PYTHON=$(PYTHON) applies only when it is created)"; \
	else \
	    py=$$($(FIND_PYTHON) $(if $(PYTHON),'$(PYTHON)')) || exit 2; \
	    echo "$(VENV): creating it with $$py ($$("$$py" -V))"; \
	    "$$py" -m venv --clear $(VENV) || exit 2; \
	fi
	@inc=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); missing=""; \
	command -v cc >/dev/null 2>&1 || missing="gcc"; \
	[ -f "$$inc/Python.h" ] || case "$$inc" in /usr/include/*) missing="$$missing python3-dev";; esac; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get (to build tunneld/_speedups.c) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 2; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c 'from tunneld import speedups; print("tunneld:", speedups.describe())'
	@touch $(STAMP)

setup: $(STAMP)

print-python:
	@$(FIND_PYTHON) $(if $(PYTHON),'$(PYTHON)')

# Not part of CI (slow): the test suite under every supported Python found on PATH or in pyenv's
# versions/, each in its own venv .venv-3.X (log in .venv-3.X/pytest.log). VERSIONS="3.12 3.13"
# limits it. Run it niced on a shared machine: `nice -n 10 make test-versions`.
VERSIONS ?=
test-versions:
	@found=$$($(FIND_PYTHON) --all) || exit 2; set -- $$found; status=0; summary=; \
	while [ $$# -ge 2 ]; do \
	    v=$$1; py=$$2; shift 2; \
	    case " $(strip $(VERSIONS)) " in "  " | *" $$v "*) ;; *) continue ;; esac; \
	    venv=.venv-$$v; echo "== Python $$v: $$py -> $$venv"; \
	    if ! $(MAKE) --no-print-directory setup PYTHON="$$py" VENV="$$venv"; then \
	        status=1; summary="$$summary\n  $$v: venv setup failed"; continue; \
	    fi; \
	    echo '*' > "$$venv/.gitignore"; \
	    "$$venv/bin/python" -m pytest -q -p no:cacheprovider > "$$venv/pytest.log" 2>&1 || status=1; \
	    last=$$(tail -n 1 "$$venv/pytest.log"); echo "   $$last"; \
	    summary="$$summary\n  $$("$$venv/bin/python" -V): $$last"; \
	done; \
	printf 'test-versions, %s:%b\n' "$$(date -u +%Y-%m-%d)" "$$summary"; exit $$status

demo: $(STAMP)
	$(VENV)/bin/tunneld demo

lint: $(STAMP)
	$(VENV)/bin/ruff check protocol relay agent tunneld tests bench tools packaging
	$(VENV)/bin/ruff format --check protocol relay agent tunneld tests bench tools packaging

typecheck: $(STAMP)
	$(VENV)/bin/mypy protocol relay agent tunneld

# Real programs the tests start themselves, from Debian: redis-server (tests/cluster/, raw TCP),
# tinyproxy (agent proxy egress), chromium and curl (browser and curl --http2 tests), nginx
# (PROXY protocol v2), wrk and h2load (tests/test_bench_https.py), buildah, podman, runc and
# mmdebstrap (the sandbox image, built and run without a Docker daemon:
# tests/agent/test_sandbox_image.py). Missing ones are installed with one apt-get run (as root,
# like CI; otherwise the message says what to install). TEST_TOOLS: command=package pairs.
TEST_TOOLS := redis-server=redis-server redis-cli=redis-tools tinyproxy=tinyproxy \
	chromium=chromium curl=curl nginx=nginx wrk=wrk h2load=nghttp2-client \
	buildah=buildah podman=podman runc=runc mmdebstrap=mmdebstrap valgrind=valgrind
ensure-test-tools:
	@missing=""; \
	for pair in $(TEST_TOOLS); do \
	    cmd=$${pair%%=*}; pkg=$${pair#*=}; \
	    command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || [ -x /usr/bin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 2; \
	else \
	    echo "missing for the tests:$$missing (apt-get install$$missing)" >&2; exit 2; \
	fi

# One of them by name, as before (the bench installs nginx and wrk its own way).
ensure-redis ensure-tinyproxy ensure-chromium ensure-nginx ensure-bench-tools: ensure-test-tools

unit: $(STAMP) ensure-test-tools
	$(PY) -m pytest --cov --cov-report=term --cov-report=html:.coverage-html -p no:cacheprovider -q \
	    --durations=15 -n 3 --dist loadfile

test: lint typecheck unit

bench-micro: $(STAMP)
	$(PY) -m pytest bench/micro --benchmark-only --benchmark-columns=mean,median,ops -q -p no:cacheprovider -o testpaths=bench

# End to end (nginx, wrk and h2load from Debian; installed with apt-get when missing and run as
# root).
bench: bench-micro
	$(PY) -m pip install -q -e '.[bench]'
	BENCH_INSTALL=1 $(PY) -m bench.e2e

bench-quick: $(STAMP)
	BENCH_INSTALL=1 $(PY) -m bench.e2e --quick --tag quick

# The agent alone, without the edge (docs/agent.md, "Installing the agent"): dist/tunnel-agent.pyz,
# one file that runs with any python3 >= 3.11 and nothing installed, and the tunnel-agent wheel
# (agent/, protocol/, relay/ with only h11, wsproto, orjson and uvloop). AGENT_BUILD=pyz builds the
# zipapp only (the wheel's build lets pip fetch setuptools, as `make setup` does).
.PHONY: agent
AGENT_BUILD ?= all
agent: $(STAMP)
	$(PY) tools/build_agent.py --out dist --what $(AGENT_BUILD)

# The example sandbox image (deploy/sandbox-image/), built from its Dockerfile without a Docker
# daemon or registry: buildah, on a local Debian bookworm base with python3 made by mmdebstrap
# (cached in build/sandbox-image/cache). The image lands in build/sandbox-image/storage;
# deploy/sandbox-image/README.md says how to run it with podman.
.PHONY: sandbox-image
sandbox-image: AGENT_BUILD = pyz
sandbox-image: agent ensure-test-tools
	sh deploy/sandbox-image/build-local.sh

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
