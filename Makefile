# flux2-trt: the two commands a new machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny
PRECISION ?= fp32
ARTIFACTS ?= artifacts/$(MODEL)-$(PRECISION)
PROMPT ?= A photograph of a red fox sitting in fresh snow at dawn
ENGINE_FLAGS ?=

.PHONY: setup demo test test-fast test-wheel lint export engines generate check gpu-smoke bench-runtime bench-cfg bench-export clean

# torch is pinned to the CPU build that lies on this workplace's disk; an unpinned torch would
# pull a multi-GB CUDA build. Production nodes install their own CUDA torch and the extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The main job on the embedded default: tiny checkpoint -> verified ONNX -> engines where TensorRT
# exists (else one line says why not) -> an image -> the check against diffusers.
demo: engines generate check

export: setup
	$(PY) -m export --model $(MODEL) --out $(ARTIFACTS) --precision $(PRECISION)

generate: setup
	$(PY) -m runtime.generate --artifacts $(ARTIFACTS) --prompt "$(PROMPT)" --steps 8 --out out/$(MODEL)-$(PRECISION)

check: setup
	$(PY) -m runtime.check --artifacts $(ARTIFACTS)

bench-runtime: setup
	PYTHONPATH=. $(PY) bench/runtime_overhead.py --artifacts $(ARTIFACTS)

bench-cfg: setup
	PYTHONPATH=. $(PY) bench/klein_cfg.py

# Export, check (TensorRT's operator list, then its real parser), build the engines. TARGET=auto:
# TensorRT where it and a GPU are present, else TensorRT-RTX (ahead of time, no GPU needed; the
# dev extra installs it), else one line saying why not (the runtime then uses ONNX Runtime).
TARGET ?= auto
engines: setup
	$(PY) -m export --model $(MODEL) --out $(ARTIFACTS) --precision $(PRECISION)
	$(PY) -m engines.check $(ARTIFACTS)
	$(PY) -m engines.build --artifacts $(ARTIFACTS) --target $(TARGET) $(ENGINE_FLAGS)

# On a GPU node with TensorRT: tiny engines vs ONNX Runtime vs PyTorch, per component.
gpu-smoke: setup
	$(PY) tools/gpu_smoke.py --precision $(PRECISION)

# The full suite: what CI runs (it needs the Triton env for the server tests); the 20 slowest tests
# are listed at the end, where the time goes.
test: setup triton-env
	$(PY) -m pytest -q --durations=20

# The inner loop: unit tests only (no end-to-end export or generation), under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The wheel as a node installs it: fresh venv, no source tree, every command (see tools/wheel_smoke.sh).
test-wheel:
	PYTHON=$(PYTHON) bash tools/wheel_smoke.sh

# Memory and time of exporting full-width FLUX.2 [dev] transformer slices (~15 GB of disk, ~15 min
# on 2 cores): see README "Streaming export".
bench-export: setup
	$(PY) -m bench.export_memory

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf artifacts out

# TensorRT-RTX ahead-of-time build of the full-width 1+1 transformer slice at fp16, bf16, fp8, nvfp4: time and
# peak host memory against the ONNX data size (~15 GB of disk, ~14 GB of RAM: a build box).
.PHONY: bench-engines
bench-engines: setup
	$(PY) -m bench.engine_build

.PHONY: bench-nvfp4-import
# The full-width 1+1 slice written as the published NVFP4 file and imported: ONNX bytes against the file's
# (goal <= 1.05 x), peak memory, time (~15 GB of disk, ~10 GB of RAM): see docs/nvfp4.md.
bench-nvfp4-import: setup
	$(PY) -m bench.nvfp4_import

.PHONY: bench-lora
# LoRA slots of rank 16 and 64 against none: the transformer's time (ort-cpu, one run, ratios) and, by
# arithmetic, the extra FLOPs and input bytes on FLUX.2 [dev] (H100 datasheet): see docs/lora.md.
bench-lora: setup
	$(PY) -m bench.lora

.PHONY: bench-resolutions
# Five image sizes against one from one folder, on the full-width FLUX.2 [dev] 1+1 slice: the graphs' bytes
# (goal <= 1.02 x) and what each further size holds of its own (~10 GB of disk while it runs): see docs/export.md.
bench-resolutions: setup
	$(PY) -m bench.resolutions

.PHONY: bench-cache
# The first-block step cache on the tiny default and stress models (ort-cpu, one process, ratios): the
# fraction of steps whose tail ran, transformer time and PSNR/SSIM against uncached: see docs/cache.md.
bench-cache: setup
	PYTHONPATH=. $(PY) -m bench.cache

.PHONY: bench-fp8-rewrite
# Bytes (sha256), time and peak anonymous memory of the FP8 rewrite and its fp32 twin: see docs/fp8.md.
bench-fp8-rewrite: setup
	$(PY) -m bench.fp8_rewrite

.PHONY: bench-editing
# What K = 0, 1, 2 reference images cost on the tiny [dev] model (ort-cpu), as ratios to K = 0: see docs/editing.md.
bench-editing: setup
	PYTHONPATH=. $(PY) bench/editing.py

# Serving on Triton (docs/serving.md). Off NVIDIA's containers the server is the tritonserver of the
# pinned nvidia-pytriton wheel, in its own env beside $(VENV): its Python-backend stub needs numpy < 2.
TRITON_ENV ?= $(VENV)-triton
REPOSITORY ?= out/triton-repository
SERVE_BACKEND ?= ort
# Loopback: tritonserver's own default is every interface. SERVE_HOST=0.0.0.0 to serve the network.
SERVE_HOST ?= 127.0.0.1
SERVE_ARGS ?=

.PHONY: triton-env serve bench-serve

$(TRITON_ENV)/flux2-triton.json: $(VENV)/.installed deploy/triton-env.txt
	$(PY) -m deploy.stub_env --out $(TRITON_ENV)
	touch $@

triton-env: $(TRITON_ENV)/flux2-triton.json

# Export -> model repository -> tritonserver in the foreground (Ctrl-C stops it cleanly).
serve: triton-env
	$(PY) -m export --model $(MODEL) --out $(ARTIFACTS) --precision $(PRECISION)
	$(PY) -m deploy.triton --artifacts $(ARTIFACTS) --repository $(REPOSITORY) --backend $(SERVE_BACKEND)
	$(PY) -m deploy.serve --repository $(REPOSITORY) --triton-env $(TRITON_ENV) --host $(SERVE_HOST) $(SERVE_ARGS)

# N concurrent clients against the server vs runtime.generate in one process, same images.
bench-serve: triton-env
	PYTHONPATH=. $(PY) bench/serve.py --triton-env $(TRITON_ENV)
