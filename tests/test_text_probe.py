"""``--metrics probe --labels FILE`` on language models: per-layer linear probes of the stream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from depthprobe.analysis import analyze
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.labels import read_labels
from depthprobe.probes.linear_probe import probe_layers
from tests.test_failfast import FAST, error_lines, loaded_weights, run
from tests.tiny_models import build_tiny, random_ids

N, T = 16, 12


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


def _own_hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """x_{l+1} of blocks 0..L-2 from the model's own ``output_hidden_states`` (the last entry
    has the final norm applied, so the last block is left out)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return [h.float() for h in out.hidden_states[1:-1]]


def test_window_labels_equal_probes_on_the_models_own_hidden_states(llama, tmp_path):
    ids = random_ids(N, T, seed=3)
    labels = np.arange(N) % 3  # three classes
    path = tmp_path / "labels.csv"
    pd.DataFrame({"window": np.arange(N), "label": [f"c{k}" for k in labels]}).to_csv(path, index=False)
    result = analyze(llama, windows=Windows(ids, "r"), metrics="probe", batch_size=5, progress=False,
                     options={"labels_file": str(path)})
    hidden = _own_hidden_states(llama, ids)
    expected, table = probe_layers([h.mean(dim=1).numpy() for h in hidden], labels, ["c0", "c1", "c2"], False)
    L = len(hidden)
    assert result.layers["probe_accuracy"].iloc[:L].tolist() == pytest.approx(expected["probe_accuracy"], abs=1e-12)
    assert result.layers["sparse_probe_units"].iloc[:L].tolist() == pytest.approx(expected["sparse_probe_units"])
    assert np.isfinite(result.layers["probe_accuracy"]).all()
    probe = result.tables["probe"]
    assert set(probe["target"]) == {"c0", "c1", "c2"} and len(probe) == 3 * len(result.layers)
    mine = probe[probe["layer"] < L].reset_index(drop=True)
    assert mine["probe_auc"].tolist() == pytest.approx(table["probe_auc"].tolist(), abs=1e-9, nan_ok=True)
    assert result.summary["probe_labels"]["per"] == "window"


def test_token_labels_read_the_state_at_that_position(llama, tmp_path):
    ids = random_ids(N, T, seed=4)
    rng = np.random.default_rng(0)
    window = np.repeat(np.arange(N), 2)
    position = rng.integers(0, T, size=len(window))
    attrs = rng.integers(0, 2, size=(len(window), 2))
    path = tmp_path / "tokens.csv"
    pd.DataFrame({"window": window, "position": position, "a": attrs[:, 0], "b": attrs[:, 1] * 2 - 1}).to_csv(
        path, index=False)
    result = analyze(llama, windows=Windows(ids, "r"), metrics="probe", batch_size=3, progress=False,
                     options={"labels_file": str(path)})
    hidden = _own_hidden_states(llama, ids)
    feats = [h[torch.as_tensor(window), torch.as_tensor(position)].numpy() for h in hidden]
    expected, _ = probe_layers(feats, attrs, ["a", "b"], True)
    assert result.layers["probe_auc"].iloc[: len(hidden)].tolist() == pytest.approx(expected["probe_auc"], abs=1e-9)
    assert result.summary["probe_labels"] == {"file": str(path), "rows": 2 * N, "per": "token",
                                              "targets": ["a", "b"], "multilabel": True}


@pytest.mark.parametrize("rows, message", [
    ({"label": ["x"] * 8}, "needs a 'window' column"),
    ({"window": range(8), "label": ["x"] * 8}, "a probe needs two classes"),
    ({"window": [0, 1, 2, 3, 4, N], "label": list("ababab")}, f"window {N} is outside 0..{N - 1}"),
    ({"window": range(6), "position": [0, 1, 2, 3, 4, T], "label": list("ababab")}, "raise --seq-len"),
    ({"window": range(6), "a": [0, 1, 2, 0, 1, 0]}, r"must hold 0/1 or -1/\+1"),
    ({"window": range(3), "label": list("aba")}, "at least 6"),
])
def test_bad_labels_files_are_one_line(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(DepthprobeError, match=message):
        read_labels(path, N, T)


def test_cli_refuses_bad_labels_before_the_model_loads(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"window": [0, 1, 2, 3, 4, 5], "label": list("ababab")}).to_csv(path, index=False)
    code, _, err = run(["analyze", "smollm2", "--metrics", "probe", "--labels", path, "-v", *FAST])
    assert code == 2 and len(error_lines(err)) == 1 and "window 2 is outside 0..1" in err
    assert not loaded_weights(err)
    code, _, err = run(["analyze", "smollm2", "--metrics", "probe", *FAST])
    assert code == 2 and "needs --labels FILE" in err and "Traceback" not in err
    code, _, err = run(["analyze", "smollm2", "--metrics", "angular", "--labels", path, *FAST])
    assert code == 2 and "add probe to --metrics" in err
