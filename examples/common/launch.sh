#!/usr/bin/env bash
# Shared body of examples/linear_moe_<base>/run_{pretrain,finetune}_<base>.sh: reads the
# upstream-style variables from the environment, checks them (one-line reason, before anything
# is launched) and starts pretrain_linear_moe.py under torchrun.
# Usage (from a wrapper): BASE_MODEL=<preset> MODE=pretrain|finetune source launch.sh
# Assumes linear_moe is installed; set PYTHON to pick the interpreter.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
: "${BASE_MODEL:?set by the run_*.sh wrapper}"
MODE=${MODE:-pretrain}

fail() { echo "linear_moe launcher: $*" >&2; exit 2; }
# Megatron requires it for TP/CP communication overlap ordering.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_GPU=1
else
    HAS_GPU=0
fi

MODEL_SIZE=${MODEL_SIZE:-tiny}
LA_MODULE=${LA_MODULE:-gla}
LAYER_TYPE_LIST=${LAYER_TYPE_LIST:-LLLN}
# A Mamba2 hybrid in Mamba notation: M = Mamba2 layer, N = softmax attention (e.g. MMMN).
if [ -n "${MAMBA2_PATTERN:-}" ]; then
    [[ "$MAMBA2_PATTERN" =~ ^[MN]+$ ]] || fail "MAMBA2_PATTERN may contain only M and N, not '$MAMBA2_PATTERN'"
    LA_MODULE=mamba2
    LAYER_TYPE_LIST=${MAMBA2_PATTERN//M/L}
fi
SEQ_LEN=${SEQ_LEN:-256}
BATCH_SIZE=${BATCH_SIZE:-8}                 # micro-batch per data-parallel rank
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
TOKENS_PER_ITER=$((GLOBAL_BATCH_SIZE * SEQ_LEN))
if [ -n "${TRAIN_TOKENS:-}" ]; then
    TRAIN_ITERS=$(( (TRAIN_TOKENS + TOKENS_PER_ITER - 1) / TOKENS_PER_ITER ))
fi
if [ "$MODE" = finetune ]; then TRAIN_ITERS=${TRAIN_ITERS:-100}; else TRAIN_ITERS=${TRAIN_ITERS:-200}; fi
if [ -n "${WARMUP_TOKENS:-}" ]; then
    WARMUP_ITERS=$(( WARMUP_TOKENS / TOKENS_PER_ITER ))
fi
WARMUP_ITERS=${WARMUP_ITERS:-$(( TRAIN_ITERS / 20 ))}
if [ "$MODE" = finetune ]; then LR=${LR:-1e-4}; MIN_LR=${MIN_LR:-1e-5}; else LR=${LR:-1e-3}; MIN_LR=${MIN_LR:-1e-4}; fi
if [ "$HAS_GPU" = 1 ]; then PR=${PR:-bf16}; else PR=${PR:-fp32}; fi
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-1}; CP=${CP:-1}
SP=${SP:-auto}                              # sequence parallel: auto = on when TP > 1
AC=${AC:-none}                              # activation recompute: none | sel | full
DO=${DO:-false}                             # distributed optimizer: true | false
if [ "$HAS_GPU" = 1 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-1}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('',0)); print(s.getsockname()[1])")}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
LOG_INTERVAL=${LOG_INTERVAL:-10}
OUTPUT_BASEPATH=${OUTPUT_BASEPATH:-$ROOT/output}
TOKENIZER_PATH=${TOKENIZER_PATH:-$("$PYTHON" -c "from linear_moe.data import default_tokenizer_path; print(default_tokenizer_path())" 2>/dev/null)}

case "$PR" in
    bf16) PRECISION=(--bf16) ;;
    fp16) PRECISION=(--fp16) ;;
    fp32) PRECISION=() ;;
    *) fail "PR must be bf16, fp16 or fp32, not '$PR'" ;;
esac
case "$AC" in
    none) RECOMPUTE=() ;;
    sel) RECOMPUTE=(--recompute-granularity selective) ;;
    full) RECOMPUTE=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
    *) fail "AC must be none, sel or full, not '$AC'" ;;
esac
case "$DO" in
    true) OPTIMIZER=(--use-distributed-optimizer)
          echo "linear_moe launcher: note: without Apex/TransformerEngine, resuming with the distributed optimizer is not bit-exact (README)" >&2 ;;
    false) OPTIMIZER=() ;;
    *) fail "DO must be true or false, not '$DO'" ;;
esac
CUDA_GRAPH=${CUDA_GRAPH:-false}              # one CUDA graph per fwd+bwd step (GPU; MoE: --moe-device-dispatch)
case "$CUDA_GRAPH" in
    true) GRAPH=(--cuda-graph-impl full_iteration --no-check-for-nan-in-loss-and-grad) ;;
    false) GRAPH=() ;;
    *) fail "CUDA_GRAPH must be true or false, not '$CUDA_GRAPH'" ;;
esac
PARALLEL=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
          --expert-model-parallel-size "$EP" --context-parallel-size "$CP")
if [ "$SP" = 1 ] || [ "$SP" = true ] || { [ "$SP" = auto ] && [ "$TP" -gt 1 ]; }; then
    PARALLEL+=(--sequence-parallel)
fi

NAME=${NAME:-${BASE_MODEL}-${MODEL_SIZE}-${LA_MODULE}-${LAYER_TYPE_LIST}-${MODE}-tp${TP}-pp${PP}-ep${EP}}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-$OUTPUT_BASEPATH/checkpoint/$NAME}

if [ "$MODE" = finetune ]; then
    [ -n "${PRETRAIN_CHECKPOINT_PATH:-}" ] || fail "set PRETRAIN_CHECKPOINT_PATH to a Megatron checkpoint directory (e.g. one written by the run_pretrain_*.sh of this base model)"
    [ -f "$PRETRAIN_CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ] || fail "no Megatron checkpoint in PRETRAIN_CHECKPOINT_PATH=$PRETRAIN_CHECKPOINT_PATH"
    SFT_DATA_PATH=${SFT_DATA_PATH:-$("$PYTHON" -m linear_moe.data.sft --output-dir "$OUTPUT_BASEPATH/data" 2>/dev/null)}
    DATA=(--sft-data-path "$SFT_DATA_PATH" --pretrained-checkpoint "$PRETRAIN_CHECKPOINT_PATH")
    [ "${SFT_PACKING:-false}" = true ] && DATA+=(--sft-packing)
else
    if [ -z "${DATASET_PATH:-}" ]; then
        DATASET_PATH=$("$PYTHON" -m linear_moe.data.default_corpus --output-dir "$OUTPUT_BASEPATH/data" 2>/dev/null)
    fi
    DATA=(--data-path "$DATASET_PATH" --split "98,2,0")
fi

ARGS=(
    --base-model "$BASE_MODEL" --model-size "$MODEL_SIZE"
    --la-module "$LA_MODULE" --layer-type-list "$LAYER_TYPE_LIST"
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
    --micro-batch-size "$BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 --clip-grad 1.0
    --adam-beta1 0.9 --adam-beta2 0.95
    "${DATA[@]}"
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_PATH"
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL"
    --ckpt-format torch_dist
    --log-interval "$LOG_INTERVAL" --eval-interval "$((TRAIN_ITERS + 1))" --eval-iters 0
    --num-workers 0 --seed "${SEED:-1234}"
    "${PRECISION[@]}" "${PARALLEL[@]}" "${RECOMPUTE[@]}" "${OPTIMIZER[@]}" "${GRAPH[@]}"
)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS+=("${EXTRA[@]}")

# Every check (preset, pattern, parallel sizes vs heads/experts/world size, data files) runs
# here, in one process, before torchrun starts anything.
if ! CHECK=$(WORLD_SIZE=$((GPUS_PER_NODE * NNODES)) "$PYTHON" -m linear_moe.pretrain \
        --check-only "${ARGS[@]}" 2>&1); then
    echo "$CHECK" | grep -m1 '^linear_moe: ' >&2 || echo "$CHECK" | tail -n 1 >&2
    exit 2
fi

mkdir -p "$OUTPUT_BASEPATH/log" "$CHECKPOINT_PATH"
echo "linear_moe: $NAME on $((GPUS_PER_NODE * NNODES)) $([ "$HAS_GPU" = 1 ] && echo GPU || echo CPU) process(es); log: $OUTPUT_BASEPATH/log/$NAME.log"
"$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$ROOT/pretrain_linear_moe.py" "${ARGS[@]}" 2>&1 | tee -a "$OUTPUT_BASEPATH/log/$NAME.log"
exit "${PIPESTATUS[0]}"
