"""Calibration batches from a spec, for the command line: random, digits, a folder of images,
or text.

``random`` draws normal noise of the input shape; ``digits`` takes scikit-learn's
handwritten digits (input shape (N, 1, 8, 8)); ``photos`` cuts crops from the two colour
photographs scikit-learn ships (``load_sample_images``: a temple in China, a flower);
``folder:PATH`` reads the JPEG/PNG images in PATH. Images are resized to the input's height
and width and, with three channels, normalised with the ImageNet mean and standard
deviation. ``stdlib`` draws windows of Python's standard library as byte token ids, for a
language model (``fxcomp.cli.stdlib_lm``).

Example::

    batches = calibration_batches("folder:images/", (1, 3, 224, 224), batches=8, batch_size=4)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fxcomp.ir.errors import InputError

__all__ = ["calibration_batches", "photo_crops"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def _folder(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no .jpg or .png images in {path}")
    mode = ImageReadMode.RGB if shape[1] == 3 else ImageReadMode.GRAY
    images = []
    for file in files:
        image = decode_image(str(file), mode=mode).float().unsqueeze(0) / 255
        image = F.interpolate(image, size=shape[2:], mode="bilinear", align_corners=False)[0]
        images.append((image - _MEAN) / _STD if shape[1] == 3 else image)
    return torch.stack(images)


def photo_crops(shape: tuple[int, ...], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` crops of scikit-learn's two sample photographs, each a random square of
    half to all of the photo's height, flipped at random, resized to ``shape``'s height and
    width and normalised as ImageNet images: (count, 3, H, W).

    Example::

        x = photo_crops((1, 3, 224, 224), 1)
    """
    from sklearn.datasets import load_sample_images

    if len(shape) != 4 or shape[1] != 3:
        raise InputError(f"photos are (N, 3, H, W) images; the model's input is {shape}")
    photos = [torch.tensor(p).permute(2, 0, 1).float() / 255 for p in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[1:]
        side = int(torch.randint(height // 2, height + 1, (1,), generator=gen))
        top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(3)
        crop = F.interpolate(crop, size=shape[2:], mode="bilinear", antialias=True)[0]
        crops.append((crop.clamp(0, 1) - _MEAN) / _STD)
    return torch.stack(crops)


def calibration_batches(
    spec: str, input_shape: tuple[int, ...], *, batches: int = 8, batch_size: int = 8
) -> list[torch.Tensor]:
    """``batches`` batches of calibration inputs shaped like ``input_shape`` (batch aside)."""
    if spec == "random":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, *input_shape[1:], generator=gen) for _ in range(batches)]
    if spec == "stdlib":
        if len(input_shape) != 2:
            raise InputError(
                f"--calib stdlib gives token ids (N, LENGTH); the model's input is {input_shape}",
                hint="give a language model's input as --input-shape 1,128",
            )
        from fxcomp.cli.stdlib_lm import stdlib_corpus, text_batches

        train = stdlib_corpus().train
        return text_batches(train, batches=batches, batch=batch_size, length=input_shape[1])
    if spec == "digits":
        if tuple(input_shape[1:]) != (1, 8, 8):
            raise InputError(
                f"--calib digits gives (N, 1, 8, 8) images; the model's input is {input_shape}",
                hint="use --calib random or folder:PATH for this model",
            )
        from fxcomp.cli.digits import load_digits_split

        images = load_digits_split().train_x
    elif spec == "photos":
        images = photo_crops(input_shape, batches * batch_size)
    elif spec.startswith("folder:"):
        path = Path(spec.removeprefix("folder:"))
        if not path.is_dir():
            raise InputError(f"calibration folder {path} does not exist")
        if len(input_shape) != 4:
            raise InputError(
                f"folder calibration needs an image input (N, C, H, W), not {input_shape}"
            )
        images = _folder(path, input_shape)
    else:
        raise InputError(
            f"unknown calibration data '{spec}'",
            hint="use random, digits, photos, folder:PATH or stdlib",
        )
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return chunks[:batches]
