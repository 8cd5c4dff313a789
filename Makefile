# `make test` and `make bench` set up .venv from requirements.txt and build the extension in it.
# PY=/path/to/python uses that interpreter as it is instead (a GPU machine without a package registry).
PY ?=
ifeq ($(PY),)
PYTHON := .venv/bin/python
ENV := .venv/.installed
else
PYTHON := $(PY)
ENV :=
endif

# Every backend must run in the tests: a missing one fails instead of being skipped.
TEST_ENV := FASTENC_REQUIRE_BACKENDS=reference,torch,triton,native

.PHONY: test bench build cmake compat gpu-check info clean

test: build
	$(TEST_ENV) $(PYTHON) -m pytest tests -q

bench: build
	$(PYTHON) -m bench

build: $(ENV)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -q -e .

# The same extension built by CMake (a first-class build for C++ work), checked by CI.
cmake: $(ENV)
	cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PYTHON))
	cmake --build build/cmake -j 2

# The GPU machine's versions (requirements-gpu-image.txt) on every CI run: the extension built against that torch
# for sm_90, the suite's Triton and torch.compile tests (the kernels through triton 3.6's interpreter) and the
# sm_90 compile of every kernel. It works on a copy of the tree, so that its build never replaces .venv's.
COMPAT := build/compat
compat: .venv-compat/.installed
	mkdir -p $(COMPAT)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(COMPAT)
	cd $(COMPAT) && TORCH_CUDA_ARCH_LIST=9.0 $(CURDIR)/.venv-compat/bin/python -m pip install --no-build-isolation --no-deps -q -e .
	cd $(COMPAT) && $(TEST_ENV) $(CURDIR)/.venv-compat/bin/python -m pytest tests -q -p no:cacheprovider \
		-k "triton or compile or resources"

.venv-compat/.installed: requirements-gpu-image.txt
	python3 -m venv .venv-compat
	.venv-compat/bin/python -m pip install -q -r requirements-gpu-image.txt
	touch $@

# What a GPU lease runs (bench/gpu_check.py): OUT names the folder for its log and results (the device machine's
# $$OUT there; on a GPU machine without a registry: make gpu-check PY=python3).
OUT ?= build/gpu-check
gpu-check: $(ENV)
	$(PYTHON) -m bench.gpu_check $(OUT)

info: build
	$(PYTHON) -m fastenc info

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf build *.egg-info fastenc/_C*.so
