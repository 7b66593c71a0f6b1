"""A real task that ships with a package: scikit-learn's 8x8 handwritten digits.

``load_digits_split`` gives normalised train/test tensors; ``DigitsNet`` is a small CNN with
BatchNorm and a residual add; ``train`` fits it in seconds on a CPU; ``accuracy`` scores
any callable model. ``upsampled_digits`` gives the same images as 3-channel 64 x 64 inputs
for torchvision's classifiers, and ``digits_classifier`` one of those trained on them
(a minute or two on two cores, about six for resnet50; cached).

Example::

    data = load_digits_split()
    model = train(DigitsNet(), data)
    accuracy(model, data.test_x, data.test_y)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fxcomp.cli.weights_cache import cached_training
from fxcomp.nn.batchnorm import reestimate_batchnorm

__all__ = [
    "DigitsData",
    "DigitsLSTM",
    "DigitsNet",
    "DigitsTransformer",
    "DigitsViT",
    "accuracy",
    "digits_classifier",
    "load_digits_split",
    "train",
    "upsampled_digits",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsData:
    """Train and test images (N, 1, 8, 8) scaled to [0, 1], with their labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def batches(self, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training set as (images, labels) batches, in a fixed order."""
        return [
            (self.train_x[i : i + size], self.train_y[i : i + size])
            for i in range(0, len(self.train_x), size)
        ]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """The 1,797 digits, shuffled with ``seed`` and split into train and test.

    Example::

        data = load_digits_split()
        data.train_x.shape   # torch.Size([1348, 1, 8, 8])
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(len(x) * (1 - test_fraction))
    return DigitsData(x[:cut], y[:cut], x[cut:], y[cut:])


class DigitsNet(nn.Module):
    """conv-bn-relu, a residual block (conv-bn, add, relu), a strided conv, pooling, linear.

    Example::

        DigitsNet()(torch.rand(2, 1, 8, 8)).shape   # torch.Size([2, 10])
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.bn(self.conv(x)))
        x = self.pool(self.down(x))
        return self.fc(torch.flatten(x, 1))


class DigitsLSTM(nn.Module):
    """Reads each digit row by row: an LSTM over the 8 rows (8 pixels each), then a Linear
    on the last step's output; a sequence model for dynamic quantization.

    Example::

        DigitsLSTM()(torch.rand(2, 1, 8, 8)).shape   # torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.squeeze(1))
        return self.fc(out[:, -1])


class DigitsTransformer(nn.Module):
    """A Transformer encoder over the 8 rows of each digit (rows embedded, a learned
    position per row), mean-pooled into a Linear classifier.

    Example::

        DigitsTransformer()(torch.rand(2, 1, 8, 8)).shape   # torch.Size([2, 10])
    """

    def __init__(
        self, width: int = 64, layers: int = 2, heads: int = 4, *, encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(1, 8, width))
        if encoder is None:
            layer = nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True
            )
            encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.encoder = encoder
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.squeeze(1)) + self.position
        return self.fc(self.encoder(tokens).mean(1))


class DigitsViT(DigitsTransformer):
    """``DigitsTransformer`` with torchvision's ViT encoder blocks (pre-norm:
    ``x + attention(LayerNorm(x))``, ``x + MLP(LayerNorm(x))``, GELU) and a final
    LayerNorm. torch.fx traces through them, so every LayerNorm -> Linear edge and every
    ``nn.MultiheadAttention`` call is in the graph, for ``unpack_attention`` and
    ``smooth_quant``.

    Example::

        DigitsViT()(torch.rand(2, 1, 8, 8)).shape   # torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        from torchvision.models.vision_transformer import EncoderBlock

        blocks = [EncoderBlock(heads, width, 2 * width, 0.0, 0.0) for _ in range(layers)]
        norm = nn.LayerNorm(width, eps=1e-6)
        super().__init__(width, layers, heads, encoder=nn.Sequential(*blocks, norm))


def train(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int = 12,
    lr: float = 0.02,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` on the training split (Adam, one-cycle schedule); returns it in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data.train_x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress or None)
    for _ in bar:
        order = torch.randperm(len(data.train_x))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def upsampled_digits(size: int = 64) -> DigitsData:
    """``load_digits_split()`` as the inputs an ImageNet-shaped classifier takes: upsampled
    bilinearly to ``size`` x ``size``, repeated over three channels, shifted and scaled to
    about zero mean and unit spread (the digits' pixel mean is 0.3 and spread 0.4).

    Example::

        upsampled_digits().train_x.shape   # torch.Size([1347, 3, 64, 64])
    """
    data = load_digits_split()

    def images(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x.repeat(1, 3, 1, 1) - 0.3) / 0.4

    return DigitsData(images(data.train_x), data.train_y, images(data.test_x), data.test_y)


_CLASSIFIER_TRAINING = {"epochs": 12, "lr": 5e-3, "seed": 0}


def digits_classifier(name: str, size: int = 64, *, progress: bool = True) -> nn.Module:
    """torchvision's ``name`` (``weights=None``, 10 classes) trained on
    ``upsampled_digits(size)`` with ``train`` (12 epochs, Adam at 5e-3, one-cycle), its
    BatchNorm statistics then re-estimated on the training images (MobileNetV3's momentum of
    0.01 leaves them far behind the weights); trained once per machine and cached
    (``fxcomp.cli.weights_cache``). In eval mode.

    Example::

        model = digits_classifier("mobilenet_v2")   # about 97% on the held-out quarter
    """
    import torchvision

    versions = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
    key = repr((name, size, _CLASSIFIER_TRAINING, versions))
    data = upsampled_digits(size)

    def fit(model: nn.Module) -> None:
        train(model, data, progress=progress, **_CLASSIFIER_TRAINING)
        reestimate_batchnorm(model, data.train_x.split(64))

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return cached_training(model, f"digits{size}-{name}", key, fit)
