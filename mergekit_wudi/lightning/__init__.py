"""PyTorch Lightning integration: :class:`WUDIMergeCallback` merges task experts at the end of training.

- :mod:`.callback`: the callback (hooks in firing order, tiny checkpointable state)
- :mod:`.strategies`: how experts are merged (mergekit's registry, MuDSC); extend by subclassing
- :mod:`.checks`: input validation (arguments in ``setup``, tensors before and after the merge)
- :mod:`.input_grams`: the opt-in mode that merges with the inputs each task's fit saw
- :mod:`.storage`: the snapshot / head / merged files under the output folder
- :mod:`.distributed`: DDP sharding of the merge and gathering of the results
"""

from mergekit_wudi.lightning.callback import WUDIMergeCallback
from mergekit_wudi.lightning.checks import MergeInputError, MergeResultError
from mergekit_wudi.lightning.input_grams import InputGrams
from mergekit_wudi.lightning.strategies import MergeStrategy, MudscMerge, RegistryMerge

__all__ = ["WUDIMergeCallback", "InputGrams", "MergeInputError", "MergeResultError", "MergeStrategy", "RegistryMerge", "MudscMerge"]
