"""Small, named patches for what megatron-core 0.19.2 cannot be told through specs or args.

Importing this package applies the patches that are always needed (see ``python311``,
``dataset_helpers`` and ``distrib_optim_resume``); the CPU
support (``cpu_support.enable()``) is applied only by callers that run without CUDA.
"""

from megatron_patch import python311  # noqa: F401  (first: later imports need it)
from megatron_patch import dataset_helpers  # noqa: F401
from megatron_patch import distrib_optim_resume  # noqa: F401
