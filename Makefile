# Two commands do all the set-up on a fresh clone:
#   make serve   serve the shipped models (gRPC 8001, metrics 8002)
#   make test    lint, format check and the whole test suite
# CI (.ci/run) also builds each documented environment alone and the image, which the suite then
# tests; by hand, one at a time:
#   make test-environments   .venv, [export], [train], [tokenizers], [tracing] each alone (.venv-envs/)
#   make test-image          the CPU image built with buildah (root; Debian's buildah)
#   make native              the native front and the benchmarks' native load generator (native/;
#                            Debian's gRPC C++, packages installed as root where missing);
#                            make test-native runs their tests
PYTHON ?= python3
SERVE_VENV := .venv
TEST_VENV := .venv-test
ENVS_DIR := .venv-envs
DEV_IMAGE := localhost/lstm-serve:dev

.PHONY: serve test test-environments test-image train-speaker train-langid verify proto clean \
	native native-deps test-native
NATIVE_BIN := native/build/lstm-serve-front
NATIVE_LOAD := native/build/lstm-serve-load

# First run only (and after pyproject.toml changes): pip shows each package as it installs.
$(SERVE_VENV)/.installed: pyproject.toml
	@echo "==> Installing lstm-serve (onnxruntime, gRPC, numpy, redis) into $(SERVE_VENV):" \
		"about a minute, once"
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	@echo "==> Installing lstm-serve with its test and training extras (torch, onnx, grpcio-tools," \
		"ruff, ...) into $(TEST_VENV): several minutes (torch is a large download), once"
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/pip install -e '.[test]'
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/lstm-serve $(ARGS)

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/ruff format --check .
	$(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-environments: $(TEST_VENV)/.installed
	bash .ci/environments.sh $(ENVS_DIR)
	LSTM_SERVE_ENVIRONMENTS=$(ENVS_DIR) $(TEST_VENV)/bin/python -m pytest tests/e2e/test_environments.py

test-image: $(TEST_VENV)/.installed
	bash .ci/image.sh $(DEV_IMAGE)
	LSTM_SERVE_IMAGE=$(DEV_IMAGE) $(TEST_VENV)/bin/python -m pytest tests/e2e/test_image.py

native-deps:
	bash .ci/native.sh deps

native: $(NATIVE_BIN) $(NATIVE_LOAD)

$(NATIVE_BIN): native/CMakeLists.txt $(wildcard native/src/*) proto/lstmserve/v1/lstm_serve.proto \
		proto/lstmserve/v1/native_front.proto
	bash .ci/native.sh

$(NATIVE_LOAD): $(NATIVE_BIN)  # built with it (one CMake project)
	test -x $@ || bash .ci/native.sh

test-native: $(TEST_VENV)/.installed $(NATIVE_BIN) $(NATIVE_LOAD)
	LSTM_SERVE_REQUIRE_NATIVE=1 $(TEST_VENV)/bin/python -m pytest tests/e2e/test_native_front.py \
		tests/e2e/test_native_supervised.py tests/e2e/test_native_load.py \
		tests/e2e/test_native_front_passthrough.py tests/e2e/test_native_multi.py \
		tests/unit/test_native_streams.py tests/integration/test_stream.py \
		tests/integration/test_text_streaming.py tests/integration/test_errors.py \
		tests/integration/test_decisions.py tests/e2e/test_native_drain.py \
		tests/e2e/test_chaos.py -k 'native or not chaos'

train-speaker: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/lstm-export train speaker-vowels --out models

train-langid: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/lstm-export train langid-chars --out models

verify: $(TEST_VENV)/.installed
	for m in models/*/*/; do $(TEST_VENV)/bin/lstm-export verify $$m || exit 1; done

proto: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python tools/codegen.py

clean:
	rm -rf $(SERVE_VENV) $(TEST_VENV) $(ENVS_DIR) native/build
