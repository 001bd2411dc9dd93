"""tgi-mp's kernels: paged attention (torch reference, C++ CPU, Triton, flash-attn),
the fused CPU layer ops, sampling helpers. Installed as `tgi_mp.kernels`.

Imported as a top-level `kernels` instead (the repository root on `sys.path`, as
pytest and the perf scripts put it), this directory would shadow Hugging Face's
`kernels` package, which transformers (>= 5.25, whose dependency it is) imports
with every model; so then it loads that package in its own place, if installed.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _hub = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _hub  # the import statement returns this module
        _spec.loader.exec_module(_hub)
