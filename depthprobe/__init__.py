"""depthprobe: does every layer of a transformer earn its place?

The flow, module by module::

    model/load.py   source -> (model, tokenizer)
    model/stack.py  LayerStack: embed -> blocks -> final norm -> head (the only family table)
    data.py         calibration text -> N windows of T tokens
    probes/         hooks, pure metric functions, the objective, the streaming main pass,
                    the sweep seam and the sweeps (drop damage, attribution)
    analysis.py     analyze(): config -> main pass -> sweeps -> summary -> AnalysisResult
    results.py      the per-layer table, summary, save/load, run-folder layout
    report/ prune/ stats.py testing/ train/ convert/   consumers of that table
    cli/            thin click commands over this API

Example:
    >>> import depthprobe
    >>> model, tok = depthprobe.load_model("smollm2")                     # doctest: +SKIP
    >>> result = depthprobe.analyze(model, tok, metrics="angular,variance,grad")  # doctest: +SKIP
    >>> result.layers.head()                                              # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from depthprobe.errors import DepthprobeError

__version__ = "0.1.0"

# Public names, imported on first use: `import depthprobe` (and so the pytest plugin, which
# pytest loads in every session) stays cheap until torch is actually needed.
_EXPORTS = {
    "analyze": "depthprobe.analysis",
    "ProbeConfig": "depthprobe.analysis",
    "AnalysisResult": "depthprobe.results",
    "LayerStack": "depthprobe.model.stack",
    "load_model": "depthprobe.model.load",
    "Windows": "depthprobe.data",
    "make_windows": "depthprobe.data",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'depthprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})  # a name imported on first use is in both


__all__ = ["AnalysisResult", "DepthprobeError", "LayerStack", "ProbeConfig", "Windows", "analyze", "load_model",
           "make_windows"]
