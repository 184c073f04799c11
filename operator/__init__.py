"""shardq.operator: the kopf operator and the rebalancer that moves slots.

Installed, this folder is ``shardq.operator`` (pyproject maps it). But when the
repository root is on ``sys.path`` (``python -m …`` run from the checkout),
``import operator`` would find this folder instead of the standard library's
module and break every program there. So, imported under the bare name
``operator``, this file loads the standard library's ``operator`` in its
place, using only what is loaded before any other import can run.
"""

import sys

if __name__ == "operator":  # pragma: no cover - only when the checkout shadows the stdlib
    import _frozen_importlib as _bootstrap
    import _frozen_importlib_external as _external
    import os as _os

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    _loader = _external.SourceFileLoader("operator", _path)
    _spec = _bootstrap.spec_from_loader("operator", _loader)
    _stdlib = _bootstrap.module_from_spec(_spec)  # type: ignore[arg-type]
    _loader.exec_module(_stdlib)
    sys.modules["operator"] = _stdlib
    globals().update({k: v for k, v in vars(_stdlib).items() if not k.startswith("__")})
