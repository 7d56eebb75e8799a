# Two commands on a fresh machine (Python >= 3.11 + make): `make demo` and `make test`.
# $(VENV) is created with PYTHON: by default the newest python3.X (X >= 11) on PATH that runs, else
# python3 when it is >= 3.11 (tools/find_python.sh; `make print-python` shows the pick). A working
# $(VENV) is reused as it is: to switch interpreters, `make clean` first or pick another VENV=.
PYTHON ?=
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FIND_PYTHON := $(SHELL) tools/find_python.sh

.PHONY: setup demo test lint typecheck unit bench bench-micro bench-quick clean print-python test-versions ensure-redis ensure-tinyproxy ensure-chromium ensure-nginx ensure-bench-tools

$(STAMP): pyproject.toml
	@if $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	    echo "$(VENV): reusing it ($$($(PY) -V))$(if $(PYTHON), - PYTHON=$(PYTHON) applies only when it is created)"; \
	else \
	    py=$$($(FIND_PYTHON) $(if $(PYTHON),'$(PYTHON)')) || exit 2; \
	    echo "$(VENV): creating it with $$py ($$("$$py" -V))"; \
	    "$$py" -m venv --clear $(VENV) || exit 2; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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

# The cluster tests (tests/cluster/) run a real redis-server: Debian's package, installed with
# apt-get when missing (as root, like CI; otherwise the message says what to install).
ensure-redis:
	@if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null || exit 2; \
	else \
	    echo "redis-server is missing: install it (apt-get install redis-server) for tests/cluster/" >&2; exit 2; \
	fi

# tests/faults/test_agent_proxy.py runs the agent through a real tinyproxy (Debian's package),
# installed the same way.
ensure-tinyproxy:
	@if command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing tinyproxy with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy >/dev/null || exit 2; \
	else \
	    echo "tinyproxy is missing: install it (apt-get install tinyproxy) for tests/faults/test_agent_proxy.py" >&2; exit 2; \
	fi

# tests/e2e/test_browser.py drives a real headless Chromium (Debian's package) and
# tests/e2e/test_http2.py runs curl --http2 (Debian's curl is built with nghttp2).
ensure-chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and curl with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium curl >/dev/null || exit 2; \
	else \
	    echo "chromium is missing: install it (apt-get install chromium curl) for tests/e2e/test_browser.py" >&2; exit 2; \
	fi

# tests/e2e/test_public_tcp.py reads PROXY protocol v2 headers with a real nginx (Debian's
# package), installed the same way.
ensure-nginx:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null || exit 2; \
	else \
	    echo "nginx is missing: install it (apt-get install nginx) for tests/e2e/test_public_tcp.py" >&2; exit 2; \
	fi

# tests/test_bench_https.py runs the bench's HTTPS scenario for one short round: wrk and h2load
# (Debian's wrk and nghttp2-client), installed the same way.
ensure-bench-tools:
	@if command -v wrk >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing wrk and nghttp2-client with apt-get ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client >/dev/null || exit 2; \
	else \
	    echo "wrk or h2load is missing: install them (apt-get install wrk nghttp2-client) for tests/test_bench_https.py" >&2; exit 2; \
	fi

unit: $(STAMP) ensure-redis ensure-tinyproxy ensure-chromium ensure-nginx ensure-bench-tools
	$(PY) -m pytest --cov --cov-report=term --cov-report=html:.coverage-html -p no:cacheprovider -q

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
