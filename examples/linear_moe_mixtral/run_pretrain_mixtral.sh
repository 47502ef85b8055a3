#!/usr/bin/env bash
# Pretrain a mixtral Linear-MoE hybrid; every setting is an environment variable (see
# examples/common/launch.sh and README.md), defaults run the tiny preset on one GPU or the CPU.
BASE_MODEL=mixtral MODE=pretrain exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/launch.sh"
