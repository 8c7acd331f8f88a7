"""genlab model/guide pairs.

Each system is an explicit Pyro model/guide pair (a ``torch.nn.Module`` with ``model`` and
``guide`` methods, as in Pyro's VAE example) plus the closed forms that belong to it.
No plotting and no file I/O here.
"""

from models.common import GenlabError, data_plate

__all__ = ["GenlabError", "data_plate"]
