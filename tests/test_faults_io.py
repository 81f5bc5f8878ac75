"""Atomic writes, the --out lock and a full disk: one writer per folder, nothing half-written,
nothing complete lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.safeio import LOCK_NAME, TMP_MARK, atomic_write, atomic_write_text, out_lock
from tests.faults_util import ROOT, output_files, read_output

R = pytest.mark.reliability
FAST = ["--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (e.g. saving a tiny model)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], err
    return lines[0]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- atomic writes
@R("the writer raises half-way through replacing a results file", "the previous file is unchanged; "
   "no temporary file is left")
def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "layers.csv"
    atomic_write_text(path, "layer,x\n0,1\n")

    def half_then_fail(tmp):
        Path(tmp).write_text("layer,x\n0,")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "layer,x\n0,1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layers.csv"]


# --------------------------------------------------------------------------- the --out lock
def _wait_for_lock(out: Path, pid: int, proc, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            holder = json.loads((out / LOCK_NAME).read_text())
            if holder.get("pid") == pid:
                return holder
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first command never took the lock")


@pytest.mark.slow
@R("two commands write into the same --out at once (analyze running; a second analyze, then a prune, start)",
   "the second and third refuse in one line naming the first's pid (exit 2); the first completes")
def test_second_writer_refuses_and_first_completes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "depthprobe", "analyze", str(tiny_dir("llama")), *FAST, "--metrics", "angular,drop",
         "--out", str(out), "--no-report"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        holder = _wait_for_lock(out, first.pid, first)
        first.send_signal(signal.SIGSTOP)  # keep it inside its run while the others try
        assert holder["command"] == "depthprobe analyze"
        code, _, err = run_cli(["analyze", tiny_dir("llama"), *FAST, "--out", out], capsys)
        one_line(code, err, f"in use by depthprobe analyze (pid {first.pid}")
        code, _, err = run_cli(["prune", tiny_dir("llama"), *FAST, "--remove", "1", "--out", out], capsys)
        one_line(code, err, f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()[-2000:]
    assert len(pd.read_csv(out / "layers.csv")) == 4 and not (out / LOCK_NAME).exists()


_HOLD = """
import sys, time
from depthprobe.safeio import out_lock
with out_lock(sys.argv[1], command="holder"):
    open(sys.argv[1] + "/.stale.csv{mark}" + str(__import__("os").getpid()), "w").write("half")
    print("locked", flush=True)
    time.sleep(600)
"""


@R("the process holding --out is killed with SIGKILL (leaving its lock file and a temporary file)",
   "the next command takes the folder over at once and removes the dead process's temporary file")
def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(mark=TMP_MARK), str(out)], env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(DepthprobeError, match=f"pid {holder.pid}"):
        with out_lock(out):
            pass
    holder.kill()
    holder.wait()
    assert (out / LOCK_NAME).exists() and list(out.glob(f"*{TMP_MARK}*"))
    with out_lock(out, command="next"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not list(out.glob(f"*{TMP_MARK}*"))
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("content", [
    pytest.param('{"pid": 999999999, "host": "HOST", "command": "depthprobe analyze"}', id="dead-pid",
                 marks=R("a lock file naming a pid that no longer exists (no flock held)", "taken over")),
    pytest.param("", id="empty", marks=R("an empty lock file (a holder killed while writing it)", "taken over")),
    pytest.param("\x00garbage{", id="garbage", marks=R("a lock file of garbage bytes", "taken over")),
])
def test_stale_lock_files_are_taken_over(content, tmp_path):
    import socket

    (tmp_path / LOCK_NAME).write_text(content.replace("HOST", socket.gethostname()))
    with out_lock(tmp_path, command="t"):
        with out_lock(tmp_path, command="nested"):  # re-entrant in one process
            assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "t"


@pytest.mark.parametrize("command", [
    pytest.param("analyze", marks=R("`analyze --out` naming an existing file", "exit 2 in one line: 'is a file'")),
    pytest.param("prune", marks=R("`prune --out` naming an existing file", "exit 2 in one line: 'is a file'")),
])
def test_out_is_a_file(command, tiny_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    extra = ["--remove", "1"] if command == "prune" else []
    code, _, err = run_cli([command, tiny_dir("llama"), *FAST, *extra, "--out", tmp_path / "taken"], capsys)
    one_line(code, err, "is a file")
    assert (tmp_path / "taken").read_text() == "x"


# --------------------------------------------------------------------------- a full disk
@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _fill(mount: Path, leave: int) -> None:
    """Fill ``mount`` until only about ``leave`` bytes are free."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@R("disk full (1 MiB tmpfs, ~40 KB free) while `analyze` rewrites a folder with a complete earlier run",
   "exit 2 in one line ('No space left on device'); every earlier file still whole; no temporary file left")
def test_disk_full_keeps_previous_outputs(tiny_dir, tiny_fs, capsys):
    out = tiny_fs / "run"
    args = ["analyze", tiny_dir("llama"), *FAST, "--metrics", "angular,variance", "--out", out]
    code, _, err = run_cli([*args, "--no-report"], capsys)
    assert code == 0, err
    before = {rel: read_output(out / rel, out) for rel in output_files(out)}
    _fill(tiny_fs, leave=40_000)  # room for the small tables, not for the ~150 KB report
    code, _, err = run_cli([*args, "--force"], capsys)  # --force: replace the run there (a failure keeps it)
    one_line(code, err, "No space left on device")
    assert output_files(out) == sorted(before)
    for rel, content in before.items():
        after = read_output(out / rel, out)
        if isinstance(content, pd.DataFrame):
            pd.testing.assert_frame_equal(after, content)
        else:
            assert after == content, rel
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


@R("disk full (ENOSPC) half-way through writing a training checkpoint", "one-line DepthprobeError; the "
   "previous checkpoint still loads with its step; no temporary file left")
def test_enospc_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from depthprobe.train.data import DataConfig
    from depthprobe.train.model import PRESETS, ModelConfig
    from depthprobe.train.trainer import CHECKPOINT, TrainConfig, Trainer

    trainer = Trainer(ModelConfig(**PRESETS["tiny"]), TrainConfig(steps=4, batch_size=2, seq_len=16, device="cpu",
                                                                   ckpt_every=2, eval_every=0, diag_every=0),
                      DataConfig(max_tokens=5000, val_windows=2), tmp_path, progress=False)
    trainer.fit(stop_at=2)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # the disk filled up part-way through the file
            fh.truncate(1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DepthprobeError, match="No space left on device") as exc:
        trainer.fit()
    assert "\n" not in str(exc.value) and CHECKPOINT in str(exc.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 2
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


@pytest.mark.slow
@R("file-size limit (RLIMIT_FSIZE 60 KB: EFBIG) while `prune` saves the pruned model over an earlier one",
   "exit 2 in one line ('File too large'); the earlier model.safetensors loads unchanged")
def test_file_size_limit_during_export(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "pruned"
    args = [sys.executable, "-m", "depthprobe", "prune", str(tiny_dir("llama")), *FAST, "--remove", "1",
            "--no-curve", "--no-report", "--out", str(out)]
    first = subprocess.run(args, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = load_file(str(out / "model.safetensors"))
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
              "from depthprobe.cli import main; main(sys.argv[1:])")
    second = subprocess.run([sys.executable, "-c", script, *args[3:-6], "--remove", "2", "--no-curve", "--no-report",
                             "--force", "--out", str(out)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in second.stderr.strip().splitlines() if line.startswith("Error")]
    assert second.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    after = load_file(str(out / "model.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("rank, locked", [
    pytest.param("0", True, marks=R("a command under torchrun, rank 0", "rank 0 takes the --out lock")),
    pytest.param("1", False, marks=R("a command under torchrun, rank 1 (same --out as rank 0)",
                                     "rank 1 writes nothing and takes no lock, so it is not refused")),
])
def test_only_rank_zero_locks(rank, locked, tmp_path, monkeypatch):
    from depthprobe.safeio import locks_out

    monkeypatch.setenv("RANK", rank)
    seen = []

    @locks_out()
    def command(out_dir):
        seen.append((Path(out_dir) / LOCK_NAME).exists())

    command(out_dir=str(tmp_path / "run"))
    assert seen == [locked]
