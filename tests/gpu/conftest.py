import pytest
import torch


@pytest.fixture(scope="module")
def megatron_single_gpu():
    """megatron-core's parallel state for one GPU process (NCCL, TP = 1), torn down after the
    module: the GPU tests that build whole models use it."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if not torch.distributed.is_initialized():  # one rank: an in-process store, no port
        torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    torch.cuda.set_device(0)
    mpu.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    yield
    mpu.destroy_model_parallel()
