"""Rich views of depthprobe's data types (Jupyter's ``_repr_html_``), registered from above.

The data types (:class:`~depthprobe.results.AnalysisResult`) sit low in the package and
import no presentation code. The package front (``depthprobe/__init__.py``, the one module
that may know every layer) registers the notebook view of :mod:`depthprobe.report` here; a
result asks this registry for its view when a notebook displays it.
"""

from __future__ import annotations

from collections.abc import Callable

_HTML_VIEWS: dict[str, Callable[[object], str]] = {}


def register_html_view(type_name: str, view: Callable[[object], str]) -> None:
    """Let ``view(obj) -> html`` render every object of the class named ``type_name``."""
    _HTML_VIEWS[type_name] = view


def html_view(obj: object) -> str | None:
    """The registered HTML of ``obj``, or None (Jupyter then shows its ``repr``)."""
    view = _HTML_VIEWS.get(type(obj).__name__)
    return view(obj) if view is not None else None
