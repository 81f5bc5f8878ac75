"""Image classifiers through `depthprobe analyze`: blocks found, metrics finite, the drop
column equal to a naive lesion, probes on a CNN trained here, and every bad input one line."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.images import load_images
from depthprobe.model.vision import VisionStack
from depthprobe.train.vision import VisionNet, VisionNetConfig, VisionTrainConfig, train_vision
from depthprobe.vision import analyze_images

transformers = pytest.importorskip("transformers")


def tiny_vision(kind: str) -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    vit = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=16,
               patch_size=4, num_labels=10)
    return {
        "resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=10)),
        "resnet-bottleneck": lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], layer_type="bottleneck", num_labels=10)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**vit)),
        "deit": lambda: t.DeiTForImageClassification(t.DeiTConfig(**vit)),
        "dinov2": lambda: t.Dinov2ForImageClassification(t.Dinov2Config(
            hidden_size=16, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=16, patch_size=4,
            num_labels=10, layerscale_value=1.0)),
        "convnext": lambda: t.ConvNextForImageClassification(t.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, num_labels=10, layer_scale_init_value=1.0)),
    }[kind]().eval()


EXPECTED_BLOCKS = {"resnet": 4, "resnet-bottleneck": 3, "vit": 3, "deit": 3, "dinov2": 3, "convnext": 4}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def naive_lesion(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` with block ``name`` swapped for a module computing its shortcut,
    written from the model's code: ResNet ``activation(shortcut(x))``, else ``x``."""
    copied = copy.deepcopy(model)
    parent_name, child = name.rsplit(".", 1)
    parent, block = copied.get_submodule(parent_name), copied.get_submodule(name)

    class Lesioned(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, *args, **kwargs):
            if hasattr(self.block, "shortcut"):
                return self.block.activation(self.block.shortcut(x))
            return x

    parent[int(child)] = Lesioned(block)
    return copied


@pytest.mark.parametrize("kind", sorted(EXPECTED_BLOCKS))
def test_blocks_found_metrics_finite_and_drop_equals_naive_lesion(kind):
    model = tiny_vision(kind)
    images = load_images("digits", image_size=16, num_images=48)
    result = analyze_images(model, images, metrics="angular,variance,grad,drop,lens", progress=False)
    layers = result.layers
    assert len(layers) == EXPECTED_BLOCKS[kind] == len(result.summary["blocks"])
    for column in ("angular_distance", "activation_variance", "grad_norm", "drop_delta_loss"):
        assert np.isfinite(layers[column]).all(), column
    with torch.no_grad():
        base = F.cross_entropy(model(images.pixels).logits, images.labels).item()
        for i, block in enumerate(result.summary["blocks"]):
            lesioned = naive_lesion(model, block["name"])
            loss = F.cross_entropy(lesioned(images.pixels).logits, images.labels).item()
            assert abs(layers.drop_delta_loss[i] - (loss - base)) < 1e-5, (kind, i)
    # the lens of the last block is the model's own loss
    assert abs(layers.logit_lens_loss.iloc[-1] - base) < 1e-5
    if kind.startswith("resnet"):
        kinds = [b["shortcut"] for b in result.summary["blocks"]]
        assert "projection" in kinds and "identity" in kinds


def test_feature_map_metrics_by_hand():
    """Each spatial position is a token: angular distance and variance from the captured maps."""
    model = tiny_vision("resnet")
    images = load_images("digits", image_size=16, num_images=8)
    stack = VisionStack.from_model(model)
    seen = {}
    handle = stack.blocks[0].module.register_forward_hook(lambda m, a, o: seen.update(x=a[0].clone(), y=o.clone()))
    with torch.no_grad():
        model(images.pixels)
    handle.remove()
    x = seen["x"].permute(0, 2, 3, 1).reshape(-1, seen["x"].shape[1]).double()
    y = seen["y"].permute(0, 2, 3, 1).reshape(-1, seen["y"].shape[1]).double()
    cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    layers = analyze_images(model, images, metrics="angular,variance", progress=False).layers
    assert layers.angular_distance[0] == pytest.approx(float(torch.arccos(cos.clamp(-1, 1)).mean() / np.pi), rel=1e-6)
    assert layers.activation_variance[0] == pytest.approx(float(y.var(1, unbiased=False).mean()), rel=1e-6)


@pytest.mark.slow
def test_cli_resnet_and_vit_folders(tmp_path, capsys):
    for kind in ("resnet", "vit"):
        tiny_vision(kind).save_pretrained(tmp_path / kind)
        out = tmp_path / f"run-{kind}"
        report = [] if kind == "resnet" else ["--no-report"]  # one report is enough; figures take seconds
        code, stdout, err = run_cli(["analyze", str(tmp_path / kind), "--images", "digits", "--image-size", "16",
                                     "--num-images", "60", "--metrics", "angular,variance,grad,drop,lens",
                                     "--out", str(out), "-q", *report], capsys)
        assert code in (0, None), err
        layers = pd.read_csv(out / "layers.csv")
        assert len(layers) == EXPECTED_BLOCKS[kind]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["objective"] == "cross_entropy" and summary["num_images"] == 60
        assert (out / "report.html").is_file() == (kind == "resnet")
        assert np.isfinite(layers.drop_delta_loss).all() and np.isfinite(layers.grad_norm).all()
    # --force into a used folder leaves exactly the new run: the old run's other files go, a user's stay
    vit_run = tmp_path / "run-vit"
    summary = json.loads((vit_run / "summary.json").read_text())
    summary["files"].append("probe.csv")  # as an earlier --metrics probe run leaves it
    (vit_run / "summary.json").write_text(json.dumps(summary))
    (vit_run / "probe.csv").write_text("target,layer\n")
    (vit_run / "notes.txt").write_text("mine")
    code, _, err = run_cli(["analyze", str(tmp_path / "vit"), "--images", "digits", "--image-size", "16",
                            "--num-images", "60", "--metrics", "variance", "--out", str(vit_run), "-q",
                            "--no-report", "--force"], capsys)
    assert code in (0, None), err
    new_files = set(json.loads((vit_run / "summary.json").read_text())["files"])
    assert {p.name for p in vit_run.iterdir()} == new_files | {"notes.txt"} and "probe.csv" not in new_files
    assert "drop_delta_loss" not in pd.read_csv(vit_run / "layers.csv")
    # `depthprobe check` compares vision runs like any other: itself passes, a moved drop value fails
    base = tmp_path / "run-resnet"
    assert run_cli(["check", str(base), "--baseline", str(base)], capsys)[0] in (0, None)
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    layers = pd.read_csv(moved / "layers.csv")
    layers.loc[1, "drop_delta_loss"] += 1.0
    layers.to_csv(moved / "layers.csv", index=False)
    assert run_cli(["check", str(moved), "--baseline", str(base)], capsys)[0] == 1


@pytest.mark.slow
def test_cnn_trained_on_digits_probe_accuracy_rises_with_depth():
    images = load_images("digits", image_size=16, num_channels=1, num_images=900)
    torch.manual_seed(0)
    net = VisionNet(VisionNetConfig(num_outputs=10, in_channels=1, channels=(8, 16, 32), blocks_per_stage=1))
    train_vision(net, images.subset(range(600)), VisionTrainConfig(steps=120, batch_size=32))
    result = analyze_images(net, images.subset(range(600, 900)), metrics="probe", progress=False)
    acc = result.layers.probe_accuracy.to_numpy()
    assert acc[-1] > acc[0] + 0.05 and acc[-1] > 0.1 + 0.5, acc
    table = result.tables["probe"]
    assert set(table.target) == {str(d) for d in range(10)} and table.sparse_probe_units.notna().all()


def _folder(tmp_path, sizes):
    from PIL import Image

    for i, size in enumerate(sizes):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (i * 20, 0, 0)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    return tmp_path / "imgs"


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    model_dir = tmp_path / "resnet"
    tiny_vision("resnet").save_pretrained(model_dir)
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    mixed = _folder(tmp_path, [16, 16, 20, 16])
    attr = tmp_path / "attr.txt"
    attr.write_text("2\nSmiling Eyeglasses\n0.png 1 -1 1\n1.png 1\n")
    same = _folder(tmp_path / "s", [16, 16])
    capsys.readouterr()  # save_pretrained's progress bar
    cases = [
        (["--images", str(empty)], "no images"),
        (["--images", str(mixed)], "--image-size"),
        (["--images", str(same / "c0"), "--attributes", str(attr)], "attribute columns"),
        (["--images", "digits", "--seq-len", "64"], "text option"),
        (["--images", "digits", "--text-file", str(attr)], "text option"),
        ([], "--images"),
    ]
    for extra, needle in cases:
        code, out, err = run_cli(["analyze", str(model_dir), *extra, "-q"], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (extra, err)
    # image options for a text model
    (tmp_path / "textmodel").mkdir()
    (tmp_path / "textmodel" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(["analyze", str(tmp_path / "textmodel"), "--images", "digits"], capsys)
    assert code == 2 and "image models" in err


def test_attribute_file_rows_must_name_images(tmp_path):
    folder = _folder(tmp_path, [8, 8])
    attr = tmp_path / "a.txt"
    attr.write_text("1\nSmiling\nmissing.png 1\n")
    with pytest.raises(DepthprobeError, match="not in"):
        load_images(folder / "c0", attr)


def test_image_objective_is_the_engines_objective_for_vision_stacks():
    from depthprobe.probes.batch import batches_of
    from depthprobe.probes.objective import objective_for
    from depthprobe.probes.vision_pass import ImageObjective

    model = tiny_vision("resnet")
    images = load_images("digits", image_size=16, num_images=10)
    stack = VisionStack.from_model(model)
    objective = objective_for(stack)
    assert isinstance(objective, ImageObjective) and objective.name == "cross_entropy"
    batch = objective.place(batches_of(images, 4)[1])
    assert batch.rows == slice(4, 8) and set(batch.inputs) == {"pixel_values"}
    with torch.no_grad():
        scores = objective.window_scores(objective.forward(batch), batch)
        by_hand = F.cross_entropy(model(images.pixels[4:8]).logits, images.labels[4:8], reduction="none")
    assert np.allclose(scores, by_hand.numpy(), atol=1e-6)


def test_a_users_module_through_layers_path():
    """Any nn.Module: the children of --layers-path are the blocks; a block that keeps the shape
    drops to the identity, one that changes it (no shortcut) is not applicable."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.features = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                                          nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
                                          nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))
            self.head = nn.Linear(16, 10)

        def forward(self, pixel_values):
            return self.head(self.features(self.stem(pixel_values)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    images = load_images("digits", image_size=16, num_images=20)
    result = analyze_images(net, images, metrics="angular,drop", layers_path="features", progress=False)
    layers = result.layers
    assert len(layers) == 3 and list(layers.downsample) == [0, 1, 0]
    with torch.no_grad():
        base = F.cross_entropy(net(images.pixels), images.labels).item()
        lesioned = copy.deepcopy(net)
        lesioned.features[2] = nn.Identity()
        expected = F.cross_entropy(lesioned(images.pixels), images.labels).item() - base
    assert abs(layers.drop_delta_loss[2] - expected) < 1e-5 and np.isnan(layers.drop_delta_loss[1])
    assert any("not applicable to block(s) 1" in n for n in result.summary["notes"])
