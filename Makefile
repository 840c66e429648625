# Shortcuts for the scripts in ci/ and the documentation site.
#   make test    bash ci/test.sh   (.venv, vectordb[test], format, lint, types, pytest)
#   make demo    bash ci/demo.sh   (.venv, vectordb, examples/mmap_demo.py)
#   make bench   bash ci/bench.sh  (.venv, vectordb[bench], the quick benchmark)
#   make docs    .venv, vectordb[docs], then mkdocs build --strict into site/
# Like the ci/ scripts, PYTHON picks the interpreter that creates .venv (default python3).

PYTHON ?= python3
VENV := .venv
# Installed once per change of pyproject.toml; later `make docs` runs need no network.
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: test demo bench docs docs-serve clean-docs

test:
	bash ci/test.sh

demo:
	bash ci/demo.sh

bench:
	bash ci/bench.sh

$(DOCS_STAMP): pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict --site-dir site

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs serve

clean-docs:
	rm -rf site
