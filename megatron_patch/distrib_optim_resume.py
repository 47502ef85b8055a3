"""Two fixes for resuming with --use-distributed-optimizer. First: it fails in megatron-core 0.19.2 without Apex or
TransformerEngine (the lent GPU has neither): before the first step, torch's Adam has no
per-parameter state, and ``DistributedOptimizer.state_dict`` (called while building the sharded
state dict to load into) asserts that all parameters share one ``step``. Megatron already fills
the state with a dummy step for its FSDP checkpoint format; do the same for every format when
loading into an optimizer with no state yet. The dummy values are overwritten by the load."""

import functools

import torch

from megatron.core.optimizer import distrib_optimizer

_original = distrib_optimizer.DistributedOptimizer.sharded_state_dict


@functools.wraps(_original)
def sharded_state_dict(self, model_sharded_state_dict={}, is_loading=False, *args, **kwargs):
    if (is_loading and not distrib_optimizer.HAVE_APEX_OR_TE
            and not self.optimizer.state_dict()["state"]):
        self._init_optimizer_states_with_dummy_values()
    return _original(self, model_sharded_state_dict, is_loading, *args, **kwargs)


distrib_optimizer.DistributedOptimizer.sharded_state_dict = sharded_state_dict


# Loading then copies the checkpoint into views of the fp32 main parameters, which require
# grad, outside torch.no_grad() ("a view of a leaf Variable that requires grad is being used in
# an in-place operation"): loading is not differentiable, so run it under no_grad.
_original_load = distrib_optimizer.DistributedOptimizer.load_state_dict


@functools.wraps(_original_load)
def load_state_dict(self, *args, **kwargs):
    with torch.no_grad():
        return _original_load(self, *args, **kwargs)


distrib_optimizer.DistributedOptimizer.load_state_dict = load_state_dict
