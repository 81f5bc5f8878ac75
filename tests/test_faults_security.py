"""Untrusted inputs: a model folder with its own code runs nothing unless --trust-remote-code
(and the flag really reaches every transformers loader), and hostile strings in a report
stay text."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from depthprobe.cli import main
from depthprobe.report.html import render
from depthprobe.results import AnalysisResult

R = pytest.mark.reliability
FAST = ["--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "--quiet", "--metrics", "angular"]

def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (e.g. saving a tiny model)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@R("a model folder whose config.json maps to Python code in the folder, without --trust-remote-code",
   "exit 2 in one line naming --trust-remote-code; the folder's code never runs")
def test_custom_code_is_refused_without_the_flag(remote_code_model, capsys):
    folder, marker = remote_code_model
    code, _, err = run_cli(["analyze", folder, *FAST], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0], err
    assert not marker.exists()


@pytest.fixture
def loader_spy(monkeypatch):
    """Records the keyword arguments every transformers loader receives."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoModel,
                transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@R("the same folder with --trust-remote-code (analyze and prune, spying on from_pretrained)",
   "the folder's code runs and the analysis completes; trust_remote_code=True reaches AutoConfig, "
   "AutoModelForCausalLM and AutoTokenizer")
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_the_flag_reaches_every_loader(command, remote_code_model, loader_spy, tmp_path, capsys):
    folder, marker = remote_code_model
    extra = (["--remove", "1", "--no-curve", "--no-report", "--out", tmp_path / "pruned"] if command == "prune"
             else ["--metrics", "angular"])
    code, _, err = run_cli([command, folder, *FAST[:-2], *extra, "--trust-remote-code"], capsys)
    assert code == 0, err
    assert marker.exists()  # the repo's own code really ran
    loaders = {name for name, _ in loader_spy}
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"} <= loaders
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in loader_spy), loader_spy


@R("a plain model folder without the flag (spying on from_pretrained)",
   "trust_remote_code=False is passed explicitly to every loader, never left to a default")
def test_without_the_flag_every_loader_gets_false(tiny_dir, loader_spy, capsys):
    code, _, err = run_cli(["analyze", tiny_dir("llama"), *FAST], capsys)
    assert code == 0, err
    assert loader_spy and all(kwargs.get("trust_remote_code") is False for _, kwargs in loader_spy)


# --------------------------------------------------------------------------- hostile strings in HTML
HOSTILE = [
    '<script>alert("model")</script>',
    '"><img src=x onerror=alert(1)>',
    "<svg onload=alert(2)>",
    "</title><script>alert(3)</script>",
    "<iframe srcdoc='<script>alert(4)</script>'>",
    "javascript:alert(5)",
]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _assert_inert(page: str, strings) -> None:
    """Only depthprobe's own markup is markup: one script, images only as data: PNGs, no
    event-handler attributes, and every hostile string is there as plain text."""
    parser = _Collector()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert tags.count("script") == 1, "a hostile string became a <script>"
    assert not {"iframe", "svg", "object", "embed"} & set(tags)
    for tag, attrs in parser.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs
        for value in attrs.values():
            assert "javascript:" not in (value or ""), (tag, attrs)
    text = "".join(parser.text)
    for s in strings:
        assert s in text, f"{s!r} is not shown as text"


def _hostile_result(i: int) -> AnalysisResult:
    evil = HOSTILE[i % len(HOSTILE)]
    layers = pd.DataFrame({"layer": [0, 1, 2], "angular_distance": [0.1, 0.2, 0.3], evil: [1.0, 2.0, 3.0]})
    summary = {"model": evil, "architecture": HOSTILE[(i + 1) % 6], "family": HOSTILE[(i + 2) % 6],
               "num_layers": 3, "num_tokens": 32, "text_source": HOSTILE[(i + 3) % 6], "dtype": "float32",
               "device": "cpu", "label": HOSTILE[(i + 4) % 6], "notes": [HOSTILE[(i + 5) % 6]],
               "versions": {evil: evil}, "timings_s": {"angular": 0.1}, "config": {"text_file": evil}}
    proxies = pd.DataFrame({"proxy": HOSTILE, evil: list(range(len(HOSTILE)))})
    return AnalysisResult(layers=layers, summary=summary, tables={"proxies": proxies})


@R("report of runs whose model name, architecture, text source, run label, notes, versions, table columns "
   "and cell values are HTML/JS injections", "every string is shown as text: one <script> (depthprobe's), "
   "no event-handler attribute, no foreign element")
def test_hostile_strings_render_as_text():
    runs = [_hostile_result(0), _hostile_result(1)]
    page = render(runs, title=HOSTILE[3])
    _assert_inert(page, HOSTILE)


@R("`analyze` of a model folder and a text file whose names are HTML injections, written to an --out folder "
   "named like one, then `depthprobe report`", "report shows the names as text; no injected element")
def test_hostile_paths_through_the_cli(tiny_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_dir("llama"), tmp_path / "<svg onload=alert(2)>"))
    text = tmp_path / '"><img src=x onerror=alert(1)>.txt'
    text.write_text("abcdefghijklmnopqrstuvwxyz " * 40)
    out = tmp_path / "<script>alert(7)<"
    code, _, err = run_cli(["analyze", model, "--text-file", text, *FAST[:-2], "--metrics", "angular,variance",
                            "--out", out], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", out, "--title", HOSTILE[0]], capsys)
    assert code == 0, err
    _assert_inert((out / "report.html").read_text(), [str(model), str(text), HOSTILE[0]])
