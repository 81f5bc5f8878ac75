"""Every command in the README's code blocks, run as written at tiny sizes (issue #18).

The commands are read from README.md at collection time, so a new or edited example is
tested without touching this file. Each runs in one scratch folder, in README order (later
examples read the folders earlier ones wrote). Sizes are shrunk (windows, steps, presets),
placeholders get local stand-ins (``./my-model`` -> a tiny Llama, ``corpus.txt`` -> prose),
and a command passes when it exits 0 without a traceback. The packaged ``smollm2`` is replaced
by a random Llama of the same depth (30 blocks, width 32) so that the whole README runs in
minutes on a shared CPU; ``DEPTHPROBE_README_REAL=1`` runs it on the real model. Commands that need what this
machine lacks (a network for hub ids, a GPU, several processes) are listed in
``NEEDS_ELSEWHERE`` and must fail the documented way instead: one ``Error:`` line, exit 2.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from depthprobe.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

#: command fragment -> why it cannot run here; it must end in one ``Error:`` line, exit 2
NEEDS_ELSEWHERE = {
    "meta-llama/Llama-2-7b": "hub id: no network here",
    "TheBloke/Llama-2-7B-GGUF": "hub id: no network here",
    "--dataset wikitext": "datasets name: no network or cache here",
    "--dataset allenai/c4": "datasets name and --device cuda: no network, no GPU here",
    "convert gpt2 ": "hub id: no network here",
    "./pre-ln-run/model": "a placeholder for the user's own trainer folder",
    "report runs/gpt2 runs/gpt2-rms": "needs the gpt2 run above",
    "check runs/today": "runs/today and runs/last-week are the user's own runs",
    "my_task.yaml": "the user's own lm-eval task file",
    "./my-resnet --images": "the user's own image classifier (tests/test_vision.py runs tiny ones)",
    "./my-vit --images": "the user's own image classifier and photo folder",
    "./facenet/model.pt": "the user's own face CNN and CelebA folder (analyses/face_attributes.py makes one)",
}
#: commands not run: they are what runs this test, or take tens of minutes by design
NOT_RUN = {
    "make ": "make targets run the whole suite / full-size demos (checked by the lead's `make test`)",
    "-m pytest -m": "the project's own test suite, which holds this test",
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def bash_commands(text: str) -> list[str]:
    """Commands of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for lang, body in code_blocks(text):
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in code_blocks(text) if lang == "python"]


COMMANDS = bash_commands(README.read_text())
PYTHON = python_blocks(README.read_text())

SHRINK = {  # option -> tiny value (calibration windows, training steps, sizes)
    "--num-sequences": "2", "--seq-len": "32", "--steps": "3", "--preset": "tiny", "--seeds": "1",
    "--attribution-steps": "2", "--block-sizes": "2", "--batch-size": "2", "--num-layers": "3",
    "--eval-limit": "20", "--limit": "20", "--heal-steps": "2", "--repair-windows": "8",
    "--prompt-lens": "16,32", "--new-tokens": "4", "--batch-sizes": "1,2", "--bench-prompt-lens": "16",
    "--bench-new-tokens": "4",
}
ADD = {  # options a command gets when it does not give them, so defaults stay small
    "analyze": {"--num-sequences": "2", "--seq-len": "32"},
    "prune": {"--num-sequences": "2", "--seq-len": "32"},
    "train": {"--max-tokens": "20000", "--val-windows": "2", "--batch-size": "2", "--seq-len": "32"},
    "compare": {"--max-tokens": "20000", "--val-windows": "2", "--batch-size": "2", "--seq-len": "32"},
    "lens": {"--steps": "2", "--num-sequences": "2", "--seq-len": "32"},
    "shrink": {"--num-sequences": "2", "--seq-len": "32", "--heldout-windows": "4", "--remeasure": "4"},
}


def shrink(words: list[str], stand_ins: dict[str, str]) -> list[str]:
    out = [stand_ins.get(w, w) for w in words]
    for i, w in enumerate(out[:-1]):
        if w in SHRINK:
            out[i + 1] = SHRINK[w]
    for option, value in ADD.get(out[0], {}).items():
        if option not in out:
            out += [option, value]
    if out[0] == "compare" and "--variants" in out:  # two placements show the side by side
        out[out.index("--variants") + 1] = "pre,post"
    return out


def depthprobe_args(command: str) -> list[str] | None:
    """The arguments after `depthprobe` (also under torchrun -m), or None for other tools."""
    words = shlex.split(command)
    if words[0].endswith("depthprobe"):
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("depthprobe") + 1:]
    return None


def run_depthprobe(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The scratch folder every example runs in, with the stand-ins it names."""
    from tests.tiny_models import save_tiny

    folder = tmp_path_factory.mktemp("readme")
    text = Path(__import__("pydoc_data.topics").topics.__file__).read_text()[:60_000]
    (folder / "corpus.txt").write_text(text)
    save_tiny("llama", folder / "my-model")
    if not REAL:
        # SmolLM2's depth and enough positions for the API defaults (256-token windows)
        save_tiny("llama", folder / "smollm2-standin", num_hidden_layers=30, max_position_embeddings=2048)
    return folder


REAL = os.environ.get("DEPTHPROBE_README_REAL") == "1"


def stand_ins(workdir: Path) -> dict[str, str]:
    return {} if REAL else {"smollm2": str(workdir / "smollm2-standin")}


@pytest.fixture(scope="module")
def outcomes(workdir):
    """Run the README's commands in order; ``command -> (exit code, stdout, stderr)``."""
    return {}


def _run_in(folder: Path, command: str, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(folder)
    args = depthprobe_args(command)
    if args is not None:
        return run_depthprobe(shrink(args, stand_ins(folder)), capsys)
    words = shlex.split(command)
    if words[0] == "pytest":  # the plugin round trip on the README's own test file
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *words[1:]],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
        return proc.returncode, proc.stdout, proc.stderr
    raise AssertionError(f"README command with an unknown tool: {command}")


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])


def test_readme_has_examples():
    assert len(COMMANDS) >= 20 and len(PYTHON) >= 3
    for fragment in (*NEEDS_ELSEWHERE, *NOT_RUN):  # a stale entry would silently excuse nothing
        assert any(fragment in c for c in COMMANDS), f"no README command matches {fragment!r} any more"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c[:60] for c in COMMANDS])
def test_readme_command(index, workdir, outcomes, capsys, monkeypatch, request):
    """Commands run in README order (each runs its predecessors first if needed); a command
    that reads a folder a later example writes (`report runs/cmp`) runs that example first."""
    for earlier in range(index + 1):
        for producer in _producers(earlier, workdir):
            _run_once(producer, workdir, outcomes, capsys, monkeypatch)
        _run_once(earlier, workdir, outcomes, capsys, monkeypatch)
    command = COMMANDS[index]
    if outcomes[index] is None:
        pytest.skip(next(why for f, why in NOT_RUN.items() if f in command))
    code, out, err = outcomes[index]
    assert "Traceback" not in out + err, f"{command}\n{out}\n{err}"
    elsewhere = [why for f, why in NEEDS_ELSEWHERE.items() if f in command]
    if elsewhere:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and lines and lines[-1].startswith("Error: "), f"{command} ({elsewhere[0]}):\n{out}\n{err}"
    else:
        assert code == 0, f"{command}\nexit {code}\n{out[-3000:]}\n{err[-3000:]}"


def _run_once(index: int, workdir: Path, outcomes: dict, capsys, monkeypatch) -> None:
    if index in outcomes:
        return
    command = COMMANDS[index]
    if any(f in command for f in NOT_RUN):
        outcomes[index] = None
        return
    if shlex.split(command)[0] == "pytest":
        _write_readme_test_file(workdir)
    try:
        outcomes[index] = _run_in(workdir, command, capsys, monkeypatch)
    except Exception as exc:  # a crash is this command's failure, not every later command's  # noqa: BLE001
        outcomes[index] = (1, "", f"Traceback: {type(exc).__name__}: {exc}")


def _producers(index: int, workdir: Path) -> list[int]:
    """Later commands whose ``--out`` is a missing folder that command ``index`` reads."""
    words = shlex.split(COMMANDS[index])
    own_out = words[words.index("--out") + 1] if "--out" in words else None
    missing = {w for w in words[1:] if w.startswith("runs/") and w != own_out and not (workdir / w).exists()}
    found = []
    for later in range(index + 1, len(COMMANDS)):
        later_words = shlex.split(COMMANDS[later])
        if "--out" in later_words and later_words[later_words.index("--out") + 1] in missing:
            found.append(later)
    return found


def _write_readme_test_file(folder: Path) -> None:
    """The README's complete pytest file, on the tiny local model instead of the user's."""
    body = next(b for b in PYTHON if b.lstrip().startswith("# tests/"))
    target = folder / body.lstrip().splitlines()[0].lstrip("# ").strip()
    target.parent.mkdir(parents=True, exist_ok=True)
    body = re.sub(r'MODEL = "[^"]*"', f'MODEL = "{folder / "my-model"}"', body)
    target.write_text(body)


@pytest.mark.slow
def test_readme_python_blocks(workdir, monkeypatch):
    """The API blocks run top to bottom in one namespace, at tiny sizes."""
    import torch

    monkeypatch.chdir(workdir)
    namespace: dict = {"torch": torch}
    for body in PYTHON:
        if body.lstrip().startswith("# tests/"):
            continue  # the plugin file: run by the pytest commands above
        body = re.sub(r"num_sequences=\d+", "num_sequences=2", body)
        body = re.sub(r"seq_len=\d+", "seq_len=32", body)
        body = re.sub(r"num_layers=\d+", "num_layers=3", body)
        body = body.replace("input_ids=...", "input_ids=torch.tensor([[1, 2, 3, 4]])")
        for name, path in stand_ins(workdir).items():
            body = body.replace(f'"{name}"', repr(path))
        body = body.replace('"runs/smol-24"', '"runs/api-smol-24"').replace('"runs/smol"', '"runs/api-smol"')
        exec(compile(body, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    result = namespace["result"]
    assert len(result.layers) == 30  # (later README blocks reuse the name `result` with other window sizes)
    pruned = namespace["r"]
    assert len(pruned.removed) == 3 and len(pruned.curve)  # (a random stand-in may even improve when pruned)
