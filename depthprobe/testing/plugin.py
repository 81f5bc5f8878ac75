"""pytest plugin (entry point ``pytest11: depthprobe``): fixtures for per-layer regression tests.

Options (group ``depthprobe``):

- ``--depthprobe-update-baseline``: ``depthprobe_baseline`` rewrites baselines instead of
  comparing against them (like syrupy's ``--snapshot-update``).
- ``--depthprobe-device``: device the ``depthprobe_analyze`` fixture loads models on
  (default ``cpu``, so CI numbers do not depend on which machine has a GPU).

Fixtures:

- ``depthprobe_analyze`` (session): ``depthprobe_analyze(source, metrics=..., num_sequences=2,
  seq_len=64, ...) -> AnalysisResult``; each model is loaded once and each distinct
  (source, data options, metrics) analyzed once per session.
- ``depthprobe_baseline`` (function): ``depthprobe_baseline(result, "baselines/mine", rtol=...)``
  is :func:`~depthprobe.testing.assertions.assert_matches_baseline` with the update flag
  bound and relative folders taken from the test file's folder.

State lives in ``config.stash`` under :data:`STATE`, not in globals.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from depthprobe.results import AnalysisResult
from depthprobe.testing.assertions import assert_matches_baseline
from depthprobe.testing.compare import DEFAULT_ATOL, DEFAULT_RTOL


@dataclass
class PluginState:
    """Per-session state: the flags, loaded models, cached results, baselines written."""

    update_baseline: bool
    device: str
    models: dict[tuple, tuple] = field(default_factory=dict)  # (source, gguf, dtype, device) -> (model, tok)
    results: dict[tuple, AnalysisResult] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


STATE = pytest.StashKey[PluginState]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("depthprobe", "depthprobe per-layer regression checks")
    group.addoption(
        "--depthprobe-update-baseline",
        action="store_true",
        default=False,
        help="depthprobe_baseline: rewrite baselines from this run instead of comparing.",
    )
    group.addoption(
        "--depthprobe-device",
        default="cpu",
        help="depthprobe_analyze: device to load models on (cpu, cuda, cuda:N, mps, auto; default cpu).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[STATE] = PluginState(
        update_baseline=config.getoption("depthprobe_update_baseline"),
        device=config.getoption("depthprobe_device"),
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None or not state.written:
        return
    terminalreporter.write_sep("-", "depthprobe")
    folders = sorted(set(state.written))
    terminalreporter.write_line(f"{len(folders)} baseline(s) written:")
    for folder in folders:
        terminalreporter.write_line(f"  {folder}")


#: ``depthprobe_analyze`` options beside metrics, windows and tokens: those of ProbeConfig ...
PROBE_OPTIONS = ("batch_size", "text_file", "dataset", "layers_path")
#: ... and those of load_model, with the plugin's defaults
LOAD_OPTIONS = {"dtype": "float32", "gguf_file": None}


@pytest.fixture(scope="session")
def depthprobe_analyze(pytestconfig: pytest.Config) -> Iterator[Callable[..., AnalysisResult]]:
    """``depthprobe_analyze(source, metrics=None, num_sequences=2, seq_len=64, **options)``.

    ``source`` is anything :func:`depthprobe.load_model` takes (hub id, folder, ``.gguf``
    file, ``smollm2``). Keyword options: ``metrics`` (default: analyze's default),
    ``num_sequences``, ``seq_len``, ``batch_size``, ``text_file``, ``dataset``, ``dtype``
    (default float32), ``gguf_file``, ``layers_path``. Each returned result is a copy, so a
    test may modify it without affecting others.
    """
    state = pytestconfig.stash[STATE]

    def analyze_cached(source: str | Path, metrics: str | Sequence[str] | None = None, num_sequences: int = 2,
                       seq_len: int = 64, **options) -> AnalysisResult:
        # torch and transformers load on first use: pytest loads this plugin in every session
        from depthprobe.analysis import analyze
        from depthprobe.config import DEFAULT_METRICS, ProbeConfig, RunOptions
        from depthprobe.model.load import load_model

        unknown = set(options) - set(PROBE_OPTIONS) - set(LOAD_OPTIONS)
        if unknown:
            raise TypeError(f"depthprobe_analyze() got unknown option(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join((*PROBE_OPTIONS, *LOAD_OPTIONS))}")
        load = {name: options.get(name, default) for name, default in LOAD_OPTIONS.items()}
        probe = {k: v for k, v in options.items() if k in PROBE_OPTIONS}
        if probe.get("text_file"):  # one cache entry per file, however it is spelled
            probe["text_file"] = str(Path(probe["text_file"]).resolve())
        config = ProbeConfig(metrics=metrics if metrics is not None else DEFAULT_METRICS, num_sequences=num_sequences,
                             seq_len=seq_len, **probe)
        model_key = (str(source), load["gguf_file"], load["dtype"], state.device)
        key = (*model_key, config.layers_path, tuple(sorted(config.metrics)), num_sequences, seq_len,
               config.batch_size, config.text_file, config.dataset)
        if key not in state.results:
            if model_key not in state.models:
                state.models[model_key] = load_model(str(source), **load, device=state.device)
            model, tokenizer = state.models[model_key]
            state.results[key] = analyze(model, tokenizer, config, run=RunOptions(progress=False, model_name=str(source)))
        return _copy(state.results[key])

    yield analyze_cached
    state.models.clear()  # free the weights when the session ends; results are small


@pytest.fixture
def depthprobe_baseline(request: pytest.FixtureRequest) -> Callable[..., object]:
    """``depthprobe_baseline(result, folder, rtol=0.05, atol=1e-8, metrics=None)``.

    Compares ``result`` with the baseline in ``folder`` (relative to the test file's folder)
    and fails naming what moved; with ``--depthprobe-update-baseline`` it rewrites the
    baseline instead.
    """
    state = request.config.stash[STATE]
    here = request.path.parent

    def check(
        result: AnalysisResult,
        folder: str | Path,
        rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL,
        metrics: str | Sequence[str] | None = None,
    ):
        __tracebackhide__ = True
        path = Path(folder)
        path = path if path.is_absolute() else here / path
        table = assert_matches_baseline(result, path, rtol=rtol, atol=atol, metrics=metrics, update=state.update_baseline)
        if state.update_baseline:
            state.written.append(path)
        return table

    return check


def _copy(result: AnalysisResult) -> AnalysisResult:
    return AnalysisResult(
        layers=result.layers.copy(),
        summary=copy.deepcopy(result.summary),
        angular_distance=None if result.angular_distance is None else result.angular_distance.copy(),
        tables={k: v.copy() for k, v in result.tables.items()},
    )
