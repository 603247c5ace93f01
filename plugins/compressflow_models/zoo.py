"""Small models for the bundled digits (64 features, or one 8x8 channel), and the paper's
LeNet-5 for 28x28 MNIST (LeNet-300-100 is ``mlp`` with in_features 784, hidden [300, 100]).

Each declares ``input_shape`` (one sample), which tells a dataset how to shape its inputs.
"""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """Fully connected: in_features -> hidden... -> num_classes, ReLU between."""

    def __init__(self, in_features: int = 64, hidden: list[int] = (300, 100), num_classes: int = 10):
        super().__init__()
        self.input_shape = (in_features,)
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.flatten(1))


class CNN(nn.Module):
    """LeNet-style for 1x8x8: two conv+pool blocks (8 -> 4 -> 2), then two Linear layers."""

    def __init__(self, channels: list[int] = (16, 32), hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.input_shape = (1, 8, 8)
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, 8, 8)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual CNN for 1x8x8: a stem, stages of BasicBlocks (width doubling, 8 -> 4)."""

    def __init__(self, width: int = 16, blocks: list[int] = (1, 1), num_classes: int = 10):
        super().__init__()
        self.input_shape = (1, 8, 8)
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for index in range(count):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and not index else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x.view(-1, 1, 8, 8)))
        return self.fc(self.pool(out).flatten(1))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as Deep Compression (Han et al. 2016, Table 1) prunes it: conv 1->20
    5x5, max-pool 2, conv 20->50 5x5, max-pool 2, Linear 800->500, ReLU, Linear 500->10.

    No nonlinearity after the convolutions (Caffe's lenet_train_test.prototxt has none);
    431,080 parameters. Input 1x28x28; flat 784-feature inputs are reshaped.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.input_shape = (1, 28, 28)
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),   # 28 -> 24 -> 12
            nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),  # 12 -> 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, 28, 28)))


BUILDERS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "lenet5": LeNet5}
