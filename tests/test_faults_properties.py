"""Property-based tests (hypothesis) over the CLI options and the Python API's arguments: no
input gives a traceback, and every rejection is one line (``Error: ...``) with exit code 2.

Values are drawn around each option's edges (0, negatives, huge, NaN, inf, junk text) and
mixed with good ones, on the tiny random Llama so that accepted inputs run in milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import depthprobe
from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.prune import prune

pytestmark = pytest.mark.slow
R = pytest.mark.reliability
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JUNK = st.sampled_from(["", " ", "abc", "-", "1e3", "0x10", "nan", "inf", "-inf", "1,2", "١٢", "\u00e9", "None",
                        "99999999999999999999", "-0", "3.5", "<script>"])


def ints(lo: int, hi: int, good=(1, 2, 4)):
    """Integers as CLI text: small good values, edges, huge ones, or junk."""
    return st.one_of(st.sampled_from(good), st.integers(lo, hi), st.sampled_from([0, -1, 2**31, 10**12]),
                     JUNK).map(str)


def floats():
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-3, 0.5])).map(str)


def cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def assert_clean(code: int, err: str, args) -> None:
    """Exit 0, or exit 2 with exactly one ``Error:`` line (the last); never a traceback."""
    assert "Traceback" not in err, (args, err)
    assert code in (0, 2), (args, code, err)
    if code == 2:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("Error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (args, err)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from depthprobe.data import builtin_text
    from tests.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("props")
    save_tiny("llama", root / "model")
    (root / "text.txt").write_text(builtin_text()[:30_000])
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return root


def _text_file(root: Path):
    return st.sampled_from([None, root / "text.txt", root / "empty.txt", root / "binary.txt", root / "missing.txt",
                            root])


@R("hypothesis: 25 random `analyze` command lines (sizes, metrics, block sizes, dtype, device, layers path, text "
   "files incl. empty/binary/missing/a folder, junk and huge numbers)", "exit 0, or exit 2 with one Error line; "
   "never a traceback")
@SETTINGS
@given(data=st.data())
def test_analyze_options(inputs, data):
    args = ["analyze", inputs / "model", "--quiet",
            "--num-sequences", data.draw(ints(-3, 50)), "--seq-len", data.draw(ints(-3, 300, good=(8, 16, 32))),
            "--batch-size", data.draw(ints(-2, 10)),
            "--metrics", data.draw(st.one_of(
                st.lists(st.sampled_from(["angular", "variance", "grad", "lens", "drop", "attribution"]),
                         min_size=0, max_size=3).map(",".join), JUNK)),
            "--block-sizes", data.draw(st.one_of(st.lists(st.integers(-2, 9), max_size=3).map(
                lambda v: ",".join(map(str, v))), JUNK)),
            "--dtype", data.draw(st.sampled_from(["float32", "float64", "bfloat16", "float8", ""])),
            "--device", data.draw(st.sampled_from(["cpu", "auto", "cuda", "mps", "tpu", "cuda:7", ""]))]
    if data.draw(st.booleans()):
        args += ["--attribution-steps", data.draw(ints(-2, 4))]
    if data.draw(st.booleans()):
        args += ["--layers-path", data.draw(st.sampled_from(["model.layers", "model", "model.nope", "", "lm_head"]))]
    text = data.draw(_text_file(inputs))
    if text is not None:
        args += ["--text-file", text]
    with tempfile.TemporaryDirectory() as out:
        if data.draw(st.booleans()):
            args += ["--out", out, "--no-report"] + (["--resume"] if data.draw(st.booleans()) else [])
        code, err = cli(args)
    assert_clean(code, err, args)


@R("hypothesis: 25 random `prune` command lines (--remove lists with duplicates/negatives/out of range/junk, "
   "--num-layers, strategies, --curve-max)", "exit 0, or exit 2 with one Error line; never a traceback")
@SETTINGS
@given(data=st.data())
def test_prune_options(inputs, data):
    args = ["prune", inputs / "model", "--quiet", "--no-report", "--num-sequences", "2", "--seq-len", "16",
            "--device", "cpu", "--strategy", data.draw(st.sampled_from(["drop", "greedy", "angular",
                                                                        "block-influence", "block", "best"]))]
    how = data.draw(st.sampled_from(["remove", "num", "both", "neither"]))
    if how in ("remove", "both"):
        args += ["--remove", data.draw(st.one_of(st.lists(st.integers(-5, 6), max_size=5).map(
            lambda v: ",".join(map(str, v))), JUNK))]
    if how in ("num", "both"):
        args += ["--num-layers", data.draw(ints(-2, 6))]
    if data.draw(st.booleans()):
        args += ["--curve-max", data.draw(ints(-2, 6))]
    else:
        args += ["--no-curve"]
    with tempfile.TemporaryDirectory() as out:
        code, err = cli([*args, "--out", out])
    assert_clean(code, err, args)


@R("hypothesis: 25 random `train` command lines (steps, batch/accumulation splits, seq len, lr and ratios incl. "
   "NaN/inf/negative, warmup, clipping, eval/diag/ckpt periods, corpus size)",
   "exit 0, or exit 2 with one Error line; never a traceback")
@SETTINGS
@given(data=st.data())
def test_train_options(inputs, data):
    args = ["train", "--quiet", "--no-report", "--device", "cpu", "--preset", "tiny",
            "--norm", data.draw(st.sampled_from(["pre", "post", "mix", "peri", "lns", "deepnorm"])),
            "--steps", data.draw(ints(-2, 3, good=(1, 2))), "--batch-size", data.draw(ints(-2, 6, good=(2, 4))),
            "--grad-accum", data.draw(ints(-1, 3, good=(1, 2))), "--seq-len", data.draw(ints(-1, 40, good=(8, 16))),
            "--lr", data.draw(floats()), "--min-lr-ratio", data.draw(floats()), "--mix-alpha", data.draw(floats()),
            "--warmup", data.draw(ints(-2, 5)), "--grad-clip", data.draw(floats()),
            "--weight-decay", data.draw(floats()),
            "--eval-every", data.draw(ints(-1, 3)), "--diag-every", data.draw(ints(-1, 3)),
            "--ckpt-every", data.draw(ints(-1, 3)), "--max-tokens", data.draw(ints(-5, 6000, good=(3000,))),
            "--val-windows", data.draw(ints(-1, 4, good=(2,)))]
    text = data.draw(_text_file(inputs))
    if text is not None:
        args += ["--text-file", text]
    with tempfile.TemporaryDirectory() as out:
        code, err = cli([*args, "--out", out])
    assert_clean(code, err, args)


# --------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def tiny(inputs):
    return depthprobe.load_model(str(inputs / "model"), device="cpu")


def _api_ok(call, check) -> None:
    """The call returns a value ``check`` accepts, or raises a one-line DepthprobeError;
    anything else fails the test."""
    try:
        value = call()
    except DepthprobeError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return
    check(value)


#: the per-layer column each metric adds (``drop`` also its sublayer columns)
METRIC_COLUMN = {"angular": "angular_distance", "variance": "activation_variance", "grad": "grad_norm",
                 "lens": "logit_lens_loss", "drop": "drop_delta_loss"}


def _analysis_checker(model, kwargs):
    """What a returned analysis must hold: one row per block, the windows asked for, and a
    finite column for every metric asked."""
    from depthprobe.config import parse_metrics

    def check(result):
        num_layers = len(depthprobe.LayerStack.from_model(model))
        assert list(result.layers["layer"]) == list(range(num_layers))
        assert (result.summary["num_sequences"], result.summary["seq_len"]) == (kwargs["num_sequences"],
                                                                                kwargs["seq_len"])
        asked = parse_metrics(kwargs["metrics"])
        assert result.summary["metrics"] == list(asked)
        for metric in asked:
            assert np.isfinite(result.layers[METRIC_COLUMN[metric]]).all(), metric
    return check


def _prune_checker(model, kwargs, num_blocks: int):
    """What a returned pruning must hold: as many blocks removed as asked, gone from the model."""
    def check(result):
        asked = kwargs["num_layers"] if kwargs["remove"] is None else len(set(kwargs["remove"]))
        assert len(result.removed) == len(set(result.removed)) == asked
        assert len(depthprobe.LayerStack.from_model(model)) == num_blocks - asked
        assert np.isfinite(result.loss_after)
    return check


@R("hypothesis: 25 random calls of depthprobe.analyze (metrics as text or lists, sizes, batch size, options "
   "dicts with junk block sizes / attribution steps)", "returns a result, or raises one-line DepthprobeError")
@SETTINGS
@given(data=st.data())
def test_analyze_api(tiny, data):
    model, tok = tiny
    metrics = data.draw(st.one_of(st.lists(st.sampled_from(["angular", "variance", "grad", "lens", "drop", "x"]),
                                           max_size=3), st.text(max_size=12)))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "block_sizes": st.lists(st.integers(-3, 9), max_size=3),
        "sublayers": st.booleans(),
        "attribution_steps": st.integers(-2, 3)}))
    kwargs = dict(num_sequences=data.draw(st.integers(-2, 6)), seq_len=data.draw(st.integers(-2, 200)),
                  batch_size=data.draw(st.integers(-2, 8)), metrics=metrics, options=options, progress=False)
    _api_ok(lambda: depthprobe.analyze(model, tok, **kwargs), _analysis_checker(model, kwargs))


@R("hypothesis: 25 random calls of depthprobe.prune on a fresh copy (remove lists, num_layers, strategy names, "
   "curve_max)", "returns a result, or raises one-line DepthprobeError")
@SETTINGS
@given(data=st.data())
def test_prune_api(inputs, data):
    model, tok = depthprobe.load_model(str(inputs / "model"), device="cpu")
    remove = data.draw(st.one_of(st.none(), st.lists(st.integers(-6, 6), max_size=5)))
    num_layers = data.draw(st.one_of(st.none(), st.integers(-2, 6)))
    kwargs = dict(remove=remove, num_layers=num_layers, strategy=data.draw(st.sampled_from(
        ["drop", "greedy", "angular", "block-influence", "block", "manual", "nope"])),
        curve=data.draw(st.booleans()), curve_max=data.draw(st.one_of(st.none(), st.integers(-2, 6))),
        num_sequences=2, seq_len=16, progress=False)
    num_blocks = len(depthprobe.LayerStack.from_model(model))
    _api_ok(lambda: prune(model, tok, **kwargs), _prune_checker(model, kwargs, num_blocks))


@R("hypothesis: 25 random TrainConfig / ModelConfig / DataConfig argument sets (incl. NaN, inf, negatives)",
   "constructed, or one-line DepthprobeError")
@SETTINGS
@given(data=st.data())
def test_train_configs(data):
    from depthprobe.train.data import DataConfig
    from depthprobe.train.model import ModelConfig
    from depthprobe.train.trainer import TrainConfig

    num = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True))
    train = {k: data.draw(num) for k in data.draw(st.lists(st.sampled_from(
        ["steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
         "grad_clip", "eval_every", "diag_every", "ckpt_every", "beta1", "beta2"]), max_size=4, unique=True))}
    model = {k: data.draw(num) for k in data.draw(st.lists(st.sampled_from(
        ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mix_alpha"]),
        max_size=3, unique=True))}
    _api_ok(lambda: TrainConfig(**train), _keeps(train))
    _api_ok(lambda: ModelConfig(**model), _keeps(model))
    given_data = {"max_tokens": data.draw(st.integers(-5, 10**7)), "val_windows": data.draw(st.integers(-3, 10))}
    _api_ok(lambda: DataConfig(**given_data), _keeps(given_data))


def _keeps(given: dict):
    """A config that was constructed holds every value as given, and none is NaN or infinite."""
    def check(config):
        for name, value in given.items():
            assert getattr(config, name) == value and np.isfinite(value), (name, value)
    return check
