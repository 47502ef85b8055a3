#!/usr/bin/env bash
# Pretrain a Qwen2-MoE-based Linear-MoE hybrid with megatron.training.pretrain.
# Assumes linear_moe is installed (pip install -e .). Every setting comes from the environment;
# the defaults train the tiny preset on the embedded corpus with one process, on the GPU if
# there is one, else on the CPU. Run it again with the same OUTPUT_BASEPATH to resume.
#
#   MODEL_SIZE=A0.3B-2B LA_MODULE=gated_deltanet LAYER_TYPE_LIST=LLLN TP=2 GPUS_PER_NODE=8 \
#     DATASET_PATH=/data/my_text_document bash examples/linear_moe_qwen2/run_pretrain_qwen.sh
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous flags).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_GPU=1
else
    HAS_GPU=0
fi

MODEL_SIZE=${MODEL_SIZE:-tiny}
LA_MODULE=${LA_MODULE:-gla}
LAYER_TYPE_LIST=${LAYER_TYPE_LIST:-LLLN}
TRAIN_ITERS=${TRAIN_ITERS:-200}
SEQ_LEN=${SEQ_LEN:-256}
BATCH_SIZE=${BATCH_SIZE:-8}                # micro-batch per data-parallel rank
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
LR=${LR:-1e-3}
MIN_LR=${MIN_LR:-1e-4}
WARMUP_ITERS=${WARMUP_ITERS:-10}
if [ "$HAS_GPU" = 1 ]; then PR=${PR:-bf16}; else PR=${PR:-fp32}; fi
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
CP=${CP:-1}
SP=${SP:-auto}                              # sequence parallel: auto = on when TP > 1
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
TOKENIZER_PATH=${TOKENIZER_PATH:-$("$PYTHON" -c "from linear_moe.data import default_tokenizer_path; print(default_tokenizer_path())")}
if [ -z "${DATASET_PATH:-}" ]; then
    DATASET_PATH=$("$PYTHON" -m linear_moe.data.default_corpus --output-dir "$OUTPUT_BASEPATH/data")
fi

NAME=${NAME:-qwen2-${MODEL_SIZE}-${LA_MODULE}-${LAYER_TYPE_LIST}-tp${TP}-pp${PP}-ep${EP}}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-$OUTPUT_BASEPATH/checkpoint/$NAME}
mkdir -p "$OUTPUT_BASEPATH/log" "$CHECKPOINT_PATH"

case "$PR" in
    bf16) PRECISION=(--bf16) ;;
    fp16) PRECISION=(--fp16) ;;
    fp32) PRECISION=() ;;
    *) echo "PR must be bf16, fp16 or fp32, not '$PR'" >&2; exit 2 ;;
esac
PARALLEL=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
          --expert-model-parallel-size "$EP" --context-parallel-size "$CP")
if [ "$SP" = 1 ] || { [ "$SP" = auto ] && [ "$TP" -gt 1 ]; }; then PARALLEL+=(--sequence-parallel); fi

ARGS=(
    --base-model qwen2_moe --model-size "$MODEL_SIZE"
    --la-module "$LA_MODULE" --layer-type-list "$LAYER_TYPE_LIST"
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
    --micro-batch-size "$BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 --clip-grad 1.0
    --adam-beta1 0.9 --adam-beta2 0.95
    --data-path "$DATASET_PATH" --split 98,2,0
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_PATH"
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL"
    --ckpt-format torch_dist
    --log-interval "$LOG_INTERVAL" --eval-interval "$((TRAIN_ITERS + 1))" --eval-iters 0
    --num-workers 0 --seed "${SEED:-1234}"
    "${PRECISION[@]}" "${PARALLEL[@]}"
)

echo "linear_moe: $NAME on $((GPUS_PER_NODE * NNODES)) $([ "$HAS_GPU" = 1 ] && echo GPU || echo CPU) process(es); log: $OUTPUT_BASEPATH/log/$NAME.log"
"$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$ROOT/pretrain_linear_moe.py" "${ARGS[@]}" ${EXTRA_ARGS:-} 2>&1 | tee -a "$OUTPUT_BASEPATH/log/$NAME.log"
exit "${PIPESTATUS[0]}"
