import os

# Tests never reach a hub; tokenizers and datasets are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import megatron_patch  # noqa: E402,F401  (before any megatron.training import)
