"""Shared fixtures: tiny random models of every family, and the real packaged models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiny_models import DECODER_FAMILIES, FAMILY_NAMES, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one thread each (and in the CLI subprocesses
    # they start), since OpenMP threads beyond the cores stall each other
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family) -> folder`` with a saved tiny random model, made once per session."""
    made: dict[str, object] = {}

    def make(family: str):
        if family not in made:
            made[family] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF de-quantized to fp32), loaded once per session."""
    import depthprobe

    return depthprobe.load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 BERT encoder, loaded once per session."""
    import depthprobe

    return depthprobe.load_model("minilm", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """A text file of English prose (the built-in corpus), as users pass with --text-file."""
    from depthprobe.data import builtin_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(builtin_text()[:200_000])
    return path


__all__ = ["DECODER_FAMILIES", "FAMILY_NAMES"]


CONFIG_CODE = '''
from pathlib import Path
from transformers import LlamaConfig

Path({marker!r}).write_text("the repo's code ran")  # what any code in a model repo could do


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
'''
MODEL_CODE = '''
from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture
def remote_code_model(tiny_dir, tmp_path):
    """A tiny Llama whose config.json points at code shipped in the folder (auto_map)."""
    folder = Path(shutil.copytree(tiny_dir("llama"), tmp_path / "remote-code-model"))
    marker = tmp_path / "CODE_RAN"
    (folder / "configuration_evil.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_llama", architectures=["EvilForCausalLM"], auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker
