# The two commands of README.md. Both set up .venv first (scripts/setup_env.sh, idempotent).
.PHONY: setup quickstart test gpu-test

setup:
	bash scripts/setup_env.sh

# Main job: the tiny Qwen2-MoE hybrid on the embedded corpus (GPU if present, else CPU).
quickstart: setup
	PYTHON=$(CURDIR)/.venv/bin/python PATH=$(CURDIR)/.venv/bin:$$PATH \
		bash examples/linear_moe_qwen2/run_pretrain_qwen.sh

# CPU test suite (what CI runs); GPU tests are skipped without CUDA. Two pytest workers: every
# test and the processes it starts run one torch thread (tests/conftest.py), so one worker left
# a core of CI's two idle; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# On a GPU machine: the fla-kernel parity suite.
gpu-test: setup
	.venv/bin/python -m pytest -q -m gpu tests/gpu
