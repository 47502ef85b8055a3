#!/usr/bin/env bash
# Finetune a deepseek_v2 Linear-MoE hybrid; every setting is an environment variable (see
# examples/common/launch.sh and README.md), defaults run the tiny preset on one GPU or the CPU.
BASE_MODEL=deepseek_v2 MODE=finetune exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/launch.sh"
