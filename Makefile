# One-command set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	# torch first and pinned: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[faces,eval,ui,serve,ray,test]"
	touch $@

install: $(VENV)/.installed

# The UI tests drive Debian's chromium through Playwright (Playwright's own browser download is not
# reachable from CI). Installed once; skipped when a chromium is already there or apt is not usable.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	    else echo "note: no chromium and no root apt-get: the browser tests will be skipped"; fi; }

demo: install
	$(BIN)/fastface demo --out out/demo

# worksteal: an idle worker takes queued tests from the busy one, so the long subprocess tests
# (eval runs, the CLI) do not leave one core idle at the end (500 s against 537 s with --dist load).
test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal tests

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/speed.py --backbone tiny

clean:
	rm -rf $(VENV) out
