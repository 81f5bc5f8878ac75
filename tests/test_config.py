"""One config, one run layout: the typed calls equal the deprecated keyword form, the moved
names still import (with a warning), and the run-folder layout reads back what was written."""

from __future__ import annotations

import copy
import json
import warnings

import pandas as pd
import pytest

import depthprobe
from depthprobe import runs
from depthprobe.config import ALL_METRICS, SWEEP_METRICS, ProbeConfig, RunOptions
from depthprobe.data import Windows
from tests.tiny_models import build_tiny, random_ids


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


def _without_timings(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timings_s"}


def test_analyze_config_equals_the_deprecated_keywords(llama):
    windows = Windows(random_ids(4, 12), "r")
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = depthprobe.analyze(llama, windows=windows, metrics="angular,grad,drop", batch_size=2, progress=False,
                                 options={"block_sizes": [2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the typed form does not warn
        new = depthprobe.analyze(llama, None, ProbeConfig(metrics="angular,grad,drop", batch_size=2,
                                                          options={"block_sizes": [2]}),
                                 windows=windows, run=RunOptions(progress=False))
    pd.testing.assert_frame_equal(old.layers, new.layers)
    assert _without_timings(old.summary) == _without_timings(new.summary)
    assert new.summary["config"]["batch_size"] == 2 and new.summary["config"]["options"]["block_sizes"] == [2]
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_windows'"):
        depthprobe.analyze(llama, windows=windows, num_windows=3)


def test_prune_config_equals_the_deprecated_keywords(llama):
    from depthprobe.prune import PruneConfig, prune

    windows = Windows(random_ids(4, 12), "r")
    with pytest.warns(DeprecationWarning):
        old = prune(copy.deepcopy(llama), None, windows=windows, num_layers=1, strategy="drop", heldout=False,
                    batch_size=2, progress=False)
    new = prune(copy.deepcopy(llama), None, PruneConfig(num_layers=1, strategy="drop", heldout=False,
                                                        probe=ProbeConfig(batch_size=2)),
                windows=windows, run=RunOptions(progress=False))
    assert old.removed == new.removed and old.loss_after == new.loss_after
    pd.testing.assert_frame_equal(old.curve, new.curve)
    assert new.analysis.summary["config"]["batch_size"] == 2


def test_config_knows_every_sweep():
    from depthprobe.analysis import SWEEPS

    assert tuple(SWEEPS) == SWEEP_METRICS and set(SWEEP_METRICS) < set(ALL_METRICS)
    assert ProbeConfig(metrics="angular, drop,angular").metrics == ("angular", "drop")


def test_moved_names_still_import():
    from depthprobe.analysis import ProbeConfig as from_analysis
    from depthprobe.probes.sweep import SweepOptions
    from depthprobe.results import load_run  # noqa: F401  (still defined there)

    assert from_analysis is ProbeConfig and depthprobe.ProbeConfig is ProbeConfig
    assert SweepOptions is depthprobe.config.SweepOptions
    with pytest.warns(DeprecationWarning, match="depthprobe.runs.model_source"):
        from depthprobe.results import model_source
    assert model_source is runs.model_source


def test_run_files_of_a_prune_folder(tmp_path, llama):
    result = depthprobe.analyze(llama, None, ProbeConfig(metrics="angular"), windows=Windows(random_ids(2, 8), "r"),
                                run=RunOptions(progress=False))
    result.save(tmp_path / runs.ANALYSIS_DIR)
    pd.DataFrame({"num_removed": [0, 1]}).to_csv(tmp_path / runs.PRUNE_CURVE_CSV, index=False)
    (tmp_path / runs.PRUNE_JSON).write_text(json.dumps({"removed": [1]}))
    files = runs.run_files(tmp_path)
    assert files.analysis == tmp_path / runs.ANALYSIS_DIR and files.prune_json == tmp_path / runs.PRUNE_JSON
    assert files.side_tables == {"prune_curve": tmp_path / runs.PRUNE_CURVE_CSV}
    loaded = depthprobe.results.load_run(tmp_path)
    assert loaded.summary["prune"] == {"removed": [1]} and list(loaded.tables["prune_curve"].num_removed) == [0, 1]
    pd.testing.assert_frame_equal(loaded.layers, result.layers)


def test_notebook_view_is_registered_by_the_package_front():
    from depthprobe.views import html_view, register_html_view

    class Other:
        pass

    assert html_view(Other()) is None  # nothing registered: Jupyter shows the repr
    register_html_view("Other", lambda obj: "<b>other</b>")
    assert html_view(Other()) == "<b>other</b>"


def test_a_curve_longer_than_the_model_is_a_one_line_error(llama):
    from depthprobe.errors import DepthprobeError
    from depthprobe.prune import PruneConfig, prune

    blocks = len(depthprobe.LayerStack.from_model(llama))
    with pytest.raises(DepthprobeError, match=f"--curve-max must be below the {blocks} blocks"):
        prune(copy.deepcopy(llama), None, PruneConfig(remove=(), curve_max=blocks), windows=Windows(random_ids(2, 8), "r"),
              run=RunOptions(progress=False))
