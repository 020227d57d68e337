# Two commands set everything up on a fresh machine:
#   make demo   - install into .venv, then run the main job: ingest real DICOM (pydicom + pydicom-data),
#                 reference energies, augmentation preview, a short CPU training run, backbone export
#   make test   - install into .venv, then run the test suite
#   make gpu-kit   - (here, with network) the GPU kit: stripped DALI wheel, dependency wheels, test data,
#                    in parts of <= 60 MiB under build/gpu-kit/ (docs/GPU.md; staging: gpu_kit plan)
#   make gpu-check - (on the GPU machine, no venv needed) every GPU stage, results in $OUT or build/gpu-check
# Override PYTHON, VENV or TORCH on the command line, e.g. `make demo TORCH="torch==2.13.0+cu130"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medswav-installed
# The representation benchmark's peer arms (lightly) run in their own environment: benchmarks/requirements-peer.txt
PEER_VENV  ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.peer-installed

.PHONY: install demo test bench-quick bench-peer-env bench-representation gpu-harness gpu-kit gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml $(shell find augment_dali/csrc -type f 2>/dev/null) augment_dali/build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m augment_dali.build
	touch $@

demo: $(STAMP)
	$(PY) -m ingest.demo --out demo_output
	$(PY) -m augment_dali.stats demo_output/dataset --samples 200 --min-size 96 --max-size 160
	$(PY) -m augment_dali.preview demo_output/dataset --config configs/cpu_demo_shards.toml --out demo_output/preview.png
	$(PY) -m train --config configs/cpu_demo_shards.toml --data demo_output/dataset --out demo_output/train
	$(PY) -m train.export demo_output/train/checkpoint.pt --out demo_output/backbone.pt
	$(PY) -m train.plot demo_output/train

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

# DALI-free CUDA kernels vs the CPU backend, then under compute-sanitizer (docs/AUGMENT_OPERATORS.md).
gpu-harness: $(STAMP)
	$(PY) -m augment_dali.harness --out gpu_harness --sanitizer

gpu-kit: $(STAMP)
	$(PY) -m benchmarks.gpu_kit build
	$(PY) -m benchmarks.gpu_kit plan

# The system python of the GPU machine (torch there); the kit installs the rest under the staging folder.
# Without make: bash .gpu/check.sh (the same command).
gpu-check:
	PYTHON=$(PYTHON) bash .gpu/check.sh

bench-peer-env: $(PEER_STAMP)

$(PEER_STAMP): benchmarks/requirements-peer.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q -r benchmarks/requirements-peer.txt
	touch $@

# medswav against lightly's SwAV and SimCLR and random initialisation (docs/EVALUATION.md, section 5)
bench-representation: $(STAMP) $(PEER_STAMP)
	MEDSWAV_PEER_PYTHON=$(PEER_VENV)/bin/python $(PY) -m benchmarks.representation --json runs/bench/representation.json

clean:
	rm -rf $(VENV) $(PEER_VENV) demo_output gpu_harness build *.egg-info augment_dali/_lib
