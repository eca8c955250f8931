"""legw_fused: LEGW large-batch training for PyTorch.

- ``LEGW``: the linear-epoch gradual warmup schedule with sqrt LR scaling (You et al., arXiv 1901.08256);
  ``LEGWScheduler`` drives any torch optimizer by it.
- ``SGD`` / ``LARS``: drop-in ``torch.optim`` optimizers taking ``lr=LEGW(...)``, evaluated on the device.
- ``LSTM`` / ``LSTMCell``: drop-in ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` with fused kernels;
  ``legw_fused.functional`` has ``lstm`` and ``lstm_cell``.
- ``backend_info()``: which step backends can run here, and why not.
- ``distributed.global_batch_size()``: the LEGW batch size under torch.distributed (ranks x per-rank batch).
"""

from . import distributed, functional
from .backends import backend_info
from .lstm import LSTM, LSTMCell
from .optim import LARS, SGD, param_groups
from .schedule import LEGW, LEGWScheduler

__all__ = ["LEGW", "LEGWScheduler", "SGD", "LARS", "param_groups", "LSTM", "LSTMCell", "functional", "distributed",
           "backend_info"]
__version__ = "0.1.0"
