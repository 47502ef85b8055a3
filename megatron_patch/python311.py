"""megatron-core 0.19.2 declares Python >= 3.12 but only one 3.12 feature stands in the way on
3.11: ``megatron/training/models/{gpt,hybrid}.py`` import ``typing.override`` (PEP 698). Give
``typing`` the identical decorator from typing_extensions before megatron.training is imported.
On Python >= 3.12 this does nothing.
"""

import sys
import typing

if sys.version_info < (3, 12) and not hasattr(typing, "override"):
    from typing_extensions import override

    typing.override = override
