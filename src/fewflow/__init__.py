"""fewflow: flow-matching generative models in PyTorch.

Time runs from t = 0 (the source, e.g. Gaussian noise) to t = 1 (data). A velocity model is
``v(x, t, **cond)``; a flow-map model is ``u(x, s, t, **cond)`` with ``x_t = x_s + (t - s) u``.
"""

from fewflow._validate import FewflowError

__version__ = "0.1.0"
__all__ = ["FewflowError", "__version__"]
