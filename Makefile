# The two commands of README.md. Both set up .venv first (scripts/setup_env.sh, idempotent).
.PHONY: setup quickstart test gpu-test

setup:
	bash scripts/setup_env.sh

# Main job: the tiny Qwen2-MoE hybrid on the embedded corpus (GPU if present, else CPU).
quickstart: setup
	PYTHON=$(CURDIR)/.venv/bin/python PATH=$(CURDIR)/.venv/bin:$$PATH \
		bash examples/linear_moe_qwen2/run_pretrain_qwen.sh

# CPU test suite (what CI runs); GPU tests are skipped without CUDA.
test: setup
	.venv/bin/python -m pytest -q tests

# On a GPU machine: the fla-kernel parity suite.
gpu-test: setup
	.venv/bin/python -m pytest -q -m gpu tests/gpu
