"""`analyze`'s image options and the image route: an image model is measured on images.

``--images digits|FOLDER``, ``--attributes FILE``, ``--image-size P``, ``--num-images N``.
An image model (a transformers image classifier folder or a depthprobe ``.pt`` vision net)
needs ``--images``; text options (``--text-file``, ``--dataset``, ``--seq-len``,
``--num-sequences``, ``--gguf-file``) are refused for it, and image options for a text model.
"""

from __future__ import annotations

from pathlib import Path

import click

from depthprobe.cli.options import owned_outputs, save_run, setup_logging
from depthprobe.config import data_free, parse_metrics
from depthprobe.errors import DepthprobeError

__all__ = ["TEXT_OPTIONS", "run_image_analysis", "vision_options"]

TEXT_OPTIONS = ("text_file", "dataset", "seq_len", "num_sequences", "gguf_file")
IMAGE_OPTIONS = ("images", "attributes", "image_size", "num_images")


def vision_options(func):
    for option in reversed((
        click.option("--images", default=None,
                     help="Image model inputs: 'digits' (scikit-learn's 8x8 digits) or a FOLDER of class subfolders."),
        click.option("--attributes", type=click.Path(dir_okay=False), default=None,
                     help="CelebA list_attr_celeba.txt naming images in --images FOLDER (+1/-1 per attribute)."),
        click.option("--image-size", type=int, default=None, help="Resize images to P x P (needed for mixed sizes)."),
        click.option("--num-images", type=int, default=None, help="Use the first N images in file order."),
    )):
        func = option(func)
    return func


def _explicit(name: str) -> bool:
    ctx = click.get_current_context()
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def run_image_analysis(opts: dict) -> bool:
    """Measure an image model when MODEL is one (True: done); refuse mixed text/image options."""
    from depthprobe.vision import DEFAULT_VISION_METRICS, is_vision_source

    image_opts = [n for n in IMAGE_OPTIONS if opts.get(n) is not None]
    vision = is_vision_source(opts["model"])
    if not vision:
        source = str(opts["model"])
        if image_opts and source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
            raise DepthprobeError(f"{source}: no such folder or file (an image classifier folder or a .pt vision net)")
        if image_opts:
            raise DepthprobeError(f"--{image_opts[0].replace('_', '-')} is for image models, and {opts['model']} is "
                                  "not one (a transformers image classifier folder or a depthprobe .pt vision net)")
        return False
    text = [n for n in TEXT_OPTIONS if _explicit(n)]
    if text:
        raise DepthprobeError(f"{opts['model']} is an image model: --{text[0].replace('_', '-')} is a text option; "
                              "use --images digits|FOLDER, --image-size, --num-images")
    metrics = opts["metrics"] if _explicit("metrics") else ",".join(DEFAULT_VISION_METRICS)
    weights_only = data_free(parse_metrics(metrics))  # spectra alone: no images read
    if opts.get("images") is None and not weights_only:
        raise DepthprobeError(f"{opts['model']} is an image model: pass --images digits or --images FOLDER")
    from depthprobe.images import load_images
    from depthprobe.model.vision import VisionStack
    from depthprobe.vision import analyze_images, load_vision_model

    # --force: the old run's files, removed once the new run is saved (a failure keeps the old run)
    opts["stale"] = owned_outputs(opts["out_dir"]) if opts["force"] and opts["out_dir"] else set()
    setup_logging(opts["verbose"])  # as text runs: no transformers progress bars or warnings unless -v
    model = load_vision_model(opts["model"], trust_remote_code=opts.get("trust_remote_code", False))
    if weights_only and opts.get("images") is None:
        result = analyze_images(model, None, metrics=metrics, layers_path=opts.get("layers_path"),
                                model_name=opts["model"], progress=not opts["quiet"])
        save_run(result, opts)
        return True
    stack = VisionStack.from_model(model, opts.get("layers_path"))
    size = opts.get("image_size") or (stack.image_size if opts["images"] == "digits" else None)
    images = load_images(opts["images"], opts.get("attributes"), size, opts.get("num_images"), stack.num_channels)
    if stack.image_size and images.pixels.shape[-1] != stack.image_size:
        raise DepthprobeError(f"{opts['model']} takes {stack.image_size}x{stack.image_size} images and these are "
                              f"{images.pixels.shape[-1]}x{images.pixels.shape[-2]}; pass --image-size {stack.image_size}")
    result = analyze_images(model, images, metrics=metrics, batch_size=opts["batch_size"] if _explicit("batch_size")
                            else 64, layers_path=opts.get("layers_path"), model_name=opts["model"],
                            progress=not opts["quiet"])
    if not opts["quiet"]:
        click.echo(format_image_table(result))
    save_run(result, opts)
    if result.summary["nonfinite"]:
        raise DepthprobeError(next(n for n in result.summary["notes"] if n.startswith("non-finite")))
    return True


def format_image_table(result) -> str:
    """The per-block table as terminal text, with a one-line header."""
    import pandas as pd

    s = result.summary
    head = (f"{s['model']}  ({s['architecture']}, {s['num_layers']} blocks, {s['num_images']} images of "
            f"{s['image_size']}x{s['image_size']}, {s['objective']} {s['base_loss']:.4f}, error {s['base_error']:.3f})")
    for note in s.get("notes", []):
        head += f"\nnote: {note}"
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_columns", 30):
        return head + "\n" + result.layers.to_string(index=False, float_format=lambda v: f"{v:.4g}")
