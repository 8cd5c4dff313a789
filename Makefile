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

.PHONY: test bench build cmake info clean

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

info: build
	$(PYTHON) -m fastenc info

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf build *.egg-info fastenc/_C*.so
