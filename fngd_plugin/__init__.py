"""FNGD-plugin core: Fast Natural Gradient Descent for PyTorch (torch only).

    from fngd_plugin import FNGD
    opt = FNGD(model.parameters(), lr=0.1, steps_per_epoch=len(loader))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
"""

from .fngd import FNGD
from .gram import solve_coefficients
from .kfac import KFAC
from .options import OptionError
from .samplers import PerSampleGrads, register_sampler
from .store import CoefficientStore

__all__ = ["FNGD", "KFAC", "CoefficientStore", "OptionError", "PerSampleGrads", "register_sampler",
           "solve_coefficients"]
__version__ = "0.1.0"
