"""The networks of the four experiments.

Where a paper leaves the architecture open the choice is ours and is documented in
bench/accuracy/README.md next to the results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BecherCNN(nn.Module):
    """Becher & Ponti's "smaller CNN" for Fashion-MNIST (the paper gives no layer list).

    Two 3x3 conv + 2x2 max-pool stages (16 and 32 channels), a 128-unit fully connected
    layer whose ReLU output is the feature space the linear SVM is trained on, and a
    10-way classifier. 206,922 parameters.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (size // 4) ** 2, 128)
        self.out = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate-layer representation (128-d)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class DozatAutoencoder(nn.Module):
    """Dozat's MNIST convolutional autoencoder (section 4.1), with leaky ReLUs.

    Encoder: 7x7 conv to 16 channels (valid, 28 -> 22), 2x2 max-pool (11), 7x7 conv to 32
    channels (same, 11), 2x2 max-pool (5), 800 -> 128 -> 16 fully connected. The decoder
    mirrors it with nearest-neighbour upsampling in place of the pools and a transposed
    7x7 conv back to 28 x 28; the output is linear (no squashing), as in the Lasagne
    autoencoder the paper adapted. Weights are Glorot-uniform and biases zero (Lasagne's
    defaults). 261,777 parameters (the paper states 224,177 without a layer list that
    adds up to it).
    """

    def __init__(self, slope: float = 0.01) -> None:
        super().__init__()
        self.slope = slope
        self.enc1 = nn.Conv2d(1, 16, 7)
        self.enc2 = nn.Conv2d(16, 32, 7, padding=3)
        self.enc3 = nn.Linear(800, 128)
        self.code = nn.Linear(128, 16)
        self.dec1 = nn.Linear(16, 128)
        self.dec2 = nn.Linear(128, 800)
        self.dec3 = nn.Conv2d(32, 16, 7, padding=3)
        self.dec4 = nn.ConvTranspose2d(16, 1, 7)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, self.slope)  # noqa: E731 - one-line helper
        h = F.max_pool2d(act(self.enc1(x)), 2)
        h = F.max_pool2d(act(self.enc2(h)), 2)
        h = act(self.enc3(h.flatten(1)))
        z = act(self.code(h))
        h = act(self.dec2(act(self.dec1(z)))).view(-1, 32, 5, 5)
        h = act(self.dec3(F.interpolate(h, size=11)))
        return self.dec4(F.interpolate(h, size=22))


class LeNet5(nn.Module):
    """LeNet-5 as commonly used on MNIST: conv 6@5x5 (padded), pool, conv 16@5x5, pool,
    120-84-10 fully connected, ReLU and max-pooling."""

    def __init__(self, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class SlidesNet(nn.Module):
    """The PyTorch MNIST example network the course slides' logs come from: conv 10@5x5,
    pool, conv 20@5x5 with dropout, pool, 320 -> 50 -> 10, log-softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


# --- CIFAR models of the TASO paper (GPU only) ------------------------------------------------

_VGG19 = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
]


class VGG19(nn.Module):
    """VGG-19 with batch norm for 32 x 32 inputs (the usual CIFAR variant: one linear head)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 x 32 inputs (3x3 stem, no initial max-pool), as used on CIFAR."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def count_parameters(model: nn.Module) -> int:
    """The number of learnable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
