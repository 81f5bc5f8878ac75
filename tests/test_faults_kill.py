"""SIGKILL at seeded random moments of a drop sweep, a greedy prune and a training run: every
resumed run ends equal to an uninterrupted one, and no output file is ever half-written.

Each test kills the command at ten moments drawn (seeded) uniformly over the length of an
uninterrupted run, copies what the kill left, resumes, and compares file by file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from depthprobe.safeio import LOCK_NAME, TMP_MARK
from tests.faults_util import assert_prefix, assert_same, output_files, read_output, run_harness
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.slow
POINTS = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from depthprobe.data import builtin_text

    root = tmp_path_factory.mktemp("kill")
    save_tiny("llama", root / "model")
    (root / "text.txt").write_text(builtin_text()[:40_000])
    return root


def _check_points(root: Path, report: dict, growing: tuple[str, ...] = ()) -> None:
    assert report["rc_ref"] == 0, (root / "ref.log").read_text()[-2000:]
    ref = root / "ref"
    ref_files = output_files(ref)
    assert ref_files, "the uninterrupted run wrote nothing"
    for i, point in enumerate(report["points"]):
        out, killed = root / f"kill{i}", root / f"kill{i}.killed"
        log = (root / f"kill{i}.log").read_text()[-2000:]
        assert point["rc_resume"] == 0, log
        # what the kill left: every output file is whole (an earlier complete version at most)
        if killed.exists():
            for rel in output_files(killed):
                content = read_output(killed / rel, killed)  # raises if cut short
                if rel.name in growing:
                    assert_prefix(content, read_output(ref / rel, ref), f"kill {i}: {rel}")
                elif (ref / rel).exists():
                    assert_same(content, read_output(ref / rel, ref), f"kill {i}: {rel} left by the kill")
        # the resumed run: the same files with the same values, no debris
        assert output_files(out) == ref_files, f"kill {i}"
        for rel in ref_files:
            assert_same(read_output(out / rel, out), read_output(ref / rel, ref), f"kill {i}: resumed {rel}")
        leftovers = [p.name for p in out.rglob("*") if TMP_MARK in p.name or p.name == LOCK_NAME]
        assert not leftovers, f"kill {i}: {leftovers}"
    # the seeded points really interrupted work
    # most points really kill (a run may still outpace its reference when the load drops)
    assert sum(p["killed"] for p in report["points"]) >= POINTS - 2


@pytest.mark.reliability("SIGKILL at 10 seeded random moments of a drop sweep (`analyze --metrics drop`), "
                         "then `--resume`", "every resumed run's files equal the uninterrupted run's; "
                         "no file the kill left is half-written")
def test_drop_sweep_survives_sigkill(workdir, tmp_path):
    args = ["analyze", str(workdir / "model"), "--metrics", "angular,drop", "--block-sizes", "2",
            "--num-sequences", "6", "--seq-len", "32", "--batch-size", "1", "--text-file",
            str(workdir / "text.txt"), "--device", "cpu", "--out", "{out}", "-q", "--no-report"]
    spec = {"root": str(tmp_path / "drop"), "argv": args, "resume_argv": [*args, "--resume"], "seed": 11,
            "points": POINTS}
    _check_points(tmp_path / "drop", run_harness(spec))


@pytest.mark.reliability("SIGKILL at 10 seeded random moments of a layer-major drop sweep (`analyze --metrics "
                         "drop --execution layer`), then `--resume`", "every resumed run's files equal the "
                         "uninterrupted run's; kills during the sweep resume from its block checkpoints")
def test_layer_major_drop_sweep_survives_sigkill(workdir, tmp_path):
    model = workdir / "model8"
    if not model.exists():
        save_tiny("llama", model, num_hidden_layers=8)
    args = ["analyze", str(model), "--metrics", "angular,drop", "--block-sizes", "2", "--execution", "layer",
            "--num-sequences", "6", "--seq-len", "32", "--batch-size", "1", "--text-file",
            str(workdir / "text.txt"), "--device", "cpu", "--out", "{out}", "-q", "--no-report"]
    spec = {"root": str(tmp_path / "drop"), "argv": args, "resume_argv": [*args, "--resume"], "seed": 15,
            "points": POINTS}
    _check_points(tmp_path / "drop", run_harness(spec))
    # some kills came in the middle of the sweep, after a block's streams were checkpointed
    killed = [tmp_path / "drop" / f"kill{i}.killed" for i in range(POINTS)]
    assert sum(bool(list(k.glob("drop_progress.layer*.bin"))) for k in killed if k.exists()) >= 2


@pytest.mark.reliability("SIGKILL at 10 seeded random moments of a greedy prune (`prune --strategy greedy`), "
                         "then `--resume`", "pruned model, prune.json, curves and analysis equal the "
                         "uninterrupted run's; no half-written file")
def test_greedy_prune_survives_sigkill(workdir, tmp_path):
    args = ["prune", str(workdir / "model"), "--num-layers", "2", "--strategy", "greedy", "--num-sequences", "4",
            "--seq-len", "32", "--batch-size", "2", "--text-file", str(workdir / "text.txt"), "--device", "cpu",
            "--out", "{out}", "-q", "--no-report"]
    spec = {"root": str(tmp_path / "prune"), "argv": args, "resume_argv": [*args, "--resume"], "seed": 12,
            "points": POINTS}
    _check_points(tmp_path / "prune", run_harness(spec))


@pytest.mark.reliability("SIGKILL at 10 seeded random moments of a training run (`train`), then `--resume` "
                         "(or a fresh start if no checkpoint was written yet)", "final weights, metrics.csv and "
                         "train_layers.csv equal the uninterrupted run's; checkpoints and tables left by a kill "
                         "are whole earlier versions")
def test_training_survives_sigkill(workdir, tmp_path):
    args = ["train", "--preset", "tiny", "--steps", "16", "--ckpt-every", "2", "--batch-size", "4", "--seq-len",
            "32", "--eval-every", "4", "--diag-every", "4", "--val-windows", "4", "--max-tokens", "20000",
            "--device", "cpu", "--precision", "fp32", "--no-report", "--text-file", str(workdir / "text.txt"),
            "--out", "{out}", "-q"]
    spec = {"root": str(tmp_path / "train"), "argv": args, "resume_argv": [*args, "--resume"],
            "fresh_argv": [*args, "--force"],
            "resume_needs": "checkpoint.pt", "seed": 13, "points": POINTS}
    _check_points(tmp_path / "train", run_harness(spec), growing=("metrics.csv", "train_layers.csv"))


@pytest.mark.reliability("SIGKILL at 10 seeded random moments of `depthprobe report` rewriting report.html",
                         "report.html is absent or a whole page after every kill; rerunning writes it")
def test_report_survives_sigkill(workdir, tmp_path):
    from depthprobe.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(workdir / "model"), "--metrics", "angular", "--num-sequences", "2", "--seq-len", "32", "--device", "cpu", "--out", str(run), "-q", "--no-report"])
    assert exc.value.code == 0
    args = ["report", str(run), "--out", "{out}/report.html", "--title", "kill test"]
    spec = {"root": str(tmp_path / "report"), "argv": args, "resume_argv": args, "seed": 14, "points": POINTS}
    report = run_harness(spec)
    _check_points(tmp_path / "report", report)
    left = [tmp_path / "report" / f"kill{i}.killed" / "report.html" for i in range(POINTS)]
    assert any(not p.exists() for p in left)  # some kills came before the report was written ...
    assert all(p.read_text().rstrip().endswith("</html>") for p in left if p.exists())  # ... none cut it short
