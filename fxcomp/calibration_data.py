"""Calibration batches from a spec, for the command line: random, digits or a folder of images.

``random`` draws normal noise of the input shape; ``digits`` takes scikit-learn's
handwritten digits (input shape (N, 1, 8, 8)); ``folder:PATH`` reads the JPEG/PNG images in
PATH, resizes them to the input's height and width and normalises them with the ImageNet
mean and standard deviation.

Example::

    batches = calibration_batches("folder:images/", (1, 3, 224, 224), batches=8, batch_size=4)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fxcomp.errors import InputError

__all__ = ["calibration_batches"]

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


def calibration_batches(
    spec: str, input_shape: tuple[int, ...], *, batches: int = 8, batch_size: int = 8
) -> list[torch.Tensor]:
    """``batches`` batches of calibration inputs shaped like ``input_shape`` (batch aside)."""
    if spec == "random":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, *input_shape[1:], generator=gen) for _ in range(batches)]
    if spec == "digits":
        if tuple(input_shape[1:]) != (1, 8, 8):
            raise InputError(
                f"--calib digits gives (N, 1, 8, 8) images; the model's input is {input_shape}",
                hint="use --calib random or folder:PATH for this model",
            )
        from fxcomp.digits import load_digits_split

        images = load_digits_split().train_x
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
            f"unknown calibration data '{spec}'", hint="use random, digits or folder:PATH"
        )
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return chunks[:batches]
