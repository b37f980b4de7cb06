"""tandem.operator: the InferencePool API, reconcile planning and the kopf operator.

This folder installs as ``tandem.operator`` (pyproject's package-dir mapping). A
folder named ``operator`` at the repository root is also what Python finds for the
standard library's ``operator`` when the root is on ``sys.path`` ahead of the
standard library (``python -c`` or ``python -m`` run from the root, in a virtual
environment that has not imported ``operator`` yet). That import means the standard
library's module, so it gets it: the guard below loads the real one in its place.
"""

if __name__ == "operator":
    # Only modules already loaded at startup (importlib.util would import
    # collections, which imports operator: a cycle).
    import importlib.machinery as _machinery
    import os as _os
    import sys as _sys

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    _loader = _machinery.SourceFileLoader("operator", _path)
    _module = type(_sys)("operator")
    _module.__spec__ = _machinery.ModuleSpec("operator", _loader, origin=_path)
    _module.__file__ = _path
    _module.__loader__ = _loader
    _sys.modules["operator"] = _module
    _loader.exec_module(_module)
