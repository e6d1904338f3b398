# kvd — set-up, serve, test. `make serve` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROTOS := $(wildcard proto/kvd/v1/*.proto)

.PHONY: install serve test lint proto clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Only the virtual environment: the project editable, with test tools.
install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

serve: install
	mkdir -p var
	$(BIN)/kvd serve

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check kvd tiers policies native tests

# Regenerate the gRPC stubs in kvd/v1 from proto/kvd/v1 (tests fail when they drift).
proto: install
	$(BIN)/python -m kvd.v1.generate

bench: install
	$(BIN)/kvd bench datapath --json

clean:
	rm -rf var build *.egg-info
