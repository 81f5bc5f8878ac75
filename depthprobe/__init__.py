"""depthprobe: does every layer of a transformer earn its place?

The flow, module by module::

    model/load.py   source -> (model, tokenizer)
    model/stack.py  LayerStack: embed -> blocks -> final norm -> head (the only family table)
    data.py         calibration text -> N windows of T tokens
    probes/         hooks, pure metric functions, the objective, the streaming main pass,
                    the sweep seam and the sweeps (drop damage, attribution)
    config.py       ProbeConfig and the sweeps' options: the one home of every default
    analysis.py     analyze(): config -> main pass -> sweeps -> summary -> AnalysisResult
    results.py      the per-layer table, summary, save/load
    runs.py         the run-folder layout: file names, where a run's analysis and model are
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

from depthprobe import autoregister
from depthprobe._version import __version__  # noqa: F401  (the package version)
from depthprobe.errors import DepthprobeError
from depthprobe.views import register_html_view

# Public names, imported on first use: `import depthprobe` (and so the pytest plugin, which
# pytest loads in every session) stays cheap until torch is actually needed.
_EXPORTS = {
    "analyze": "depthprobe.analysis",
    "ProbeConfig": "depthprobe.config",
    "RunOptions": "depthprobe.config",
    "AnalysisResult": "depthprobe.results",
    "LayerStack": "depthprobe.model.stack",
    "load_model": "depthprobe.model.load",
    "Windows": "depthprobe.data",
    "make_windows": "depthprobe.data",
}


def _notebook_view(result) -> str:
    """A result in a notebook: :func:`depthprobe.report.notebook.result_html` (matplotlib is
    imported on first display, so importing depthprobe stays cheap)."""
    from depthprobe.report.notebook import result_html

    return result_html(result)


# shrunk folders (model_type depthprobe_shrunk) load with plain AutoModelForCausalLM once depthprobe is imported
autoregister.install()

# the package front wires the notebook view to the data type: results imports nothing of report
register_html_view("AnalysisResult", _notebook_view)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'depthprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})  # a name imported on first use is in both


__all__ = ["AnalysisResult", "DepthprobeError", "LayerStack", "ProbeConfig", "RunOptions", "Windows", "analyze",
           "load_model", "make_windows"]
