"""What a new user hits (issue #18): each test repeats the user's step and checks what they
should see. Fast tests on hand-made runs and tiny random models; real models marked slow."""

from __future__ import annotations

import pytest

from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.report import figures as F
from tests.test_report import synthetic


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def figure_texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts)


# --- 1. runs with different metric sets side by side ---------------------------------------

def _without(result, columns):
    result.layers = result.layers.drop(columns=columns)
    return result


def test_report_of_runs_with_different_metrics(tmp_path, capsys):
    full = synthetic(8, name="full")
    drop_only = _without(synthetic(8, name="droponly"), ["logit_lens_loss", "grad_norm", "grad_norm_attn",
                                                          "grad_norm_mlp", "activation_variance"])
    full.save(tmp_path / "full")
    drop_only.save(tmp_path / "droponly")
    code, out, err = run_cli(["report", str(tmp_path / "full"), str(tmp_path / "droponly"),
                              "--out", str(tmp_path / "both.html")], capsys)
    assert code == 0, err
    assert (tmp_path / "both.html").stat().st_size > 10_000

    fig = F.plot_lens([full, drop_only])
    lines = [line for line in fig.axes[0].lines if line.get_linestyle() != "--"]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == list(full.layers["logit_lens_loss"])
    assert "not measured in: droponly" in figure_texts(fig)
    fig = F.plot_grad_norms([full, drop_only])
    assert "not measured in: droponly" in figure_texts(fig)
    fig = F.plot_layers([drop_only, full], ["activation_variance"])
    assert len(fig.axes[0].lines) == 1 and "not measured in: droponly" in figure_texts(fig)
    # both have the metric: nothing to note
    assert figure_texts(F.plot_layers([drop_only, full], ["angular_distance"])) == ""


# --- 5. notebook figures ---------------------------------------------------------------------

@pytest.mark.parametrize("plot", [F.plot_angular_heatmap, F.plot_drop, F.plot_prune_curve, F.plot_lens,
                                  F.plot_grad_norms, F.plot_block_drop])
def test_figures_take_a_single_result(plot):
    result = synthetic(8)
    single, listed = plot(result), plot([result])
    assert single is not None
    # the same picture: same axes, same data in the first axes
    assert len(single.axes) == len(listed.axes)
    first = [tuple(line.get_ydata()) for line in single.axes[0].lines]
    assert first == [tuple(line.get_ydata()) for line in listed.axes[0].lines]


def test_plot_layers_with_a_typo_says_which_columns_exist():
    with pytest.raises(DepthprobeError, match=r"no column 'angular_distanse'.*choose from .*angular_distance"):
        F.plot_layers([synthetic(8)], ["angular_distanse"])
    # a known metric a run did not measure is not a mistake: nothing to draw
    assert F.plot_layers([_without(synthetic(8), ["logit_lens_loss"])], ["logit_lens_loss"]) is None


def test_plot_layers_single_result_draws_the_values():
    result = synthetic(8)
    fig = F.plot_layers(result, ["angular_distance"])
    assert list(fig.axes[0].lines[0].get_ydata()) == list(result.layers["angular_distance"])
