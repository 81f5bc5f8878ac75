"""depthprobe: does every layer of a transformer earn its place?

The flow, module by module::

    model/load.py   source -> (model, tokenizer)
    model/stack.py  LayerStack: embed -> blocks -> final norm -> head (the only family table)
    data.py         calibration text -> N windows of T tokens
    probes/         hooks and pure metric functions
    analyze.py      one streaming pass (+ sweeps) -> AnalysisResult
    results.py      the per-layer table, summary, save/load
    report/ prune/ stats.py testing/ train/ convert/   consumers of that table
    cli/            thin click commands over this API

Example:
    >>> import depthprobe
    >>> model, tok = depthprobe.load_model("smollm2")                     # doctest: +SKIP
    >>> result = depthprobe.analyze(model, tok, metrics="angular,variance,grad")  # doctest: +SKIP
    >>> result.layers.head()                                              # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from depthprobe.analyze import ProbeConfig, analyze
from depthprobe.data import Windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.model import LayerStack, load_model
from depthprobe.results import AnalysisResult

__all__ = [
    "AnalysisResult",
    "DepthprobeError",
    "LayerStack",
    "ProbeConfig",
    "Windows",
    "analyze",
    "load_model",
    "make_windows",
]
