"""legw_fused: LEGW large-batch training for PyTorch.

- ``LEGW``: the linear-epoch gradual warmup schedule with sqrt LR scaling (You et al., arXiv 1901.08256);
  ``LEGWScheduler`` drives any torch optimizer by it.
- ``SGD`` / ``LARS``: drop-in ``torch.optim`` optimizers taking ``lr=LEGW(...)``, evaluated on the device.
- ``LSTM`` / ``LSTMCell``: drop-in ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` with fused kernels;
  ``legw_fused.functional`` has ``lstm`` and ``lstm_cell``.
- ``backend_info()``: which step backends can run here, and why not.
- ``distributed.global_batch_size()``: the LEGW batch size under torch.distributed (ranks x per-rank batch).
"""

import torch

from . import distributed, functional
from .backends import backend_info
from .lstm import LSTM, LSTMCell
from .optim import LARS, SGD, param_groups
from .schedule import LEGW, LEGWScheduler

# torch.load(weights_only=True) reads a pickled LSTM / LSTMCell (torch.save(model)) and a LEGW held anywhere in a
# checkpoint: each pickles as its class plus plain values and tensors, so the classes are all it needs.
torch.serialization.add_safe_globals([LEGW, LSTM, LSTMCell])

__all__ = ["LEGW", "LEGWScheduler", "SGD", "LARS", "param_groups", "LSTM", "LSTMCell", "functional", "distributed",
           "backend_info"]
__version__ = "0.1.0"
