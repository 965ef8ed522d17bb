"""LeNet-5, a custom MLP of the same size, and a regularized LeNet-5, for 28x28 MNIST.

LeNet-5 follows Y. LeCun, L. Bottou, Y. Bengio and P. Haffner, "Gradient-based
learning applied to document recognition", Proc. IEEE 86(11), 1998, in its
common modern form: max-pooling instead of trainable subsampling, a full
C3 connection table, and a plain linear output layer instead of RBF units.
Every model returns logits; ``nn.CrossEntropyLoss`` applies the softmax.

    python model.py    # per-layer table and parameter total of each model
"""

import sys

import torch
from torch import nn

import cli
from dataset import IMAGE_SIDE

NUM_CLASSES = 10
DROPOUT = 0.1  # lenet5_reg's rate, chosen on the validation split (docs/recipe.md)
KERNEL = 5
# 28 -conv 5x5, pad 2-> 28 -pool-> 14 -conv 5x5-> 10 -pool-> 5
FEATURE_SIDE = (IMAGE_SIDE // 2 - KERNEL + 1) // 2
C1, C3, F5, F6 = 6, 16, 120, 84  # widths named after the paper's layers


class LeNet5(nn.Module):
    """LeNet-5: two convolution + max-pool stages, then three fully connected layers.

    ReLU is the activation: it trains much faster than the paper's scaled tanh
    with plain SGD and is what a modern baseline uses. Pooling comes before
    the ReLU: max-pooling commutes with any non-decreasing function, so the
    result is the same as ReLU-then-pool, on a quarter of the values.

    | layer | output     | formula                    | parameters |
    |-------|------------|----------------------------|-----------:|
    | conv1 | 6x28x28    | (5*5*1 + 1) * 6            |        156 |
    | pool  | 6x14x14    |                            |          0 |
    | conv2 | 16x10x10   | (5*5*6 + 1) * 16           |      2,416 |
    | pool  | 16x5x5     |                            |          0 |
    | fc1   | 120        | (16*5*5 + 1) * 120         |     48,120 |
    | fc2   | 84         | (120 + 1) * 84             |     10,164 |
    | fc3   | 10         | (84 + 1) * 10              |        850 |
    | total |            |                            |     61,706 |
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, C1, KERNEL, padding=KERNEL // 2)
        self.conv2 = nn.Conv2d(C1, C3, KERNEL)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(C3 * FEATURE_SIDE**2, F5)
        self.fc2 = nn.Linear(F5, F6)
        self.fc3 = nn.Linear(F6, NUM_CLASSES)
        self.relu = nn.ReLU()

    # Channels-last: a faster training step on a CPU (docs/performance.md).
    memory_format = torch.channels_last
    # What ``inside`` shows: {name: the module whose output, after ReLU, is that layer's feature
    # maps}.
    INSIDE = {"conv1": "conv1", "conv2": "conv2"}

    def forward(self, x):  # (N, 1, 28, 28)
        x = self.relu(self.pool(self.conv1(x)))  # (N, 6, 14, 14)
        x = self.relu(self.pool(self.conv2(x)))  # (N, 16, 5, 5)
        x = x.flatten(1)  # (N, 400)
        x = self.relu(self.fc1(x))  # (N, 120)
        x = self.relu(self.fc2(x))  # (N, 84)
        return self.fc3(x)  # (N, 10)


class LeNet5Regularized(LeNet5):
    """LeNet-5 with BatchNorm after each convolution and the first two fully connected layers, and
    Dropout.

    BatchNorm (before each ReLU) keeps activations well scaled, which allows
    fast, stable SGD and regularizes through batch noise. The technique that
    matters most, augmentation of the training images with broad random
    changes of shape and look (``distortions.distort``), lives in distortions.py.
    Dropout before fc2 and fc3 (rate ``dropout``, DROPOUT by default) stops the
    classifier leaning on single features; the rate was chosen on the validation
    split over three seeds (docs/recipe.md). ``batchnorm=False`` or ``dropout=0``
    turn one off, for ablations.

    | layer | output   | formula               | parameters |
    |-------|----------|-----------------------|-----------:|
    | LeNet-5 layers   | as in LeNet5  |               |     61,706 |
    | bn1   | 6x28x28  | 2 * 6 (scale, shift)  |         12 |
    | bn2   | 16x10x10 | 2 * 16                |         32 |
    | bn3   | 120      | 2 * 120               |        240 |
    | bn4   | 84       | 2 * 84                |        168 |
    | dropout |        |                       |          0 |
    | total |          | 61,706 + 452          |     62,158 |

    BatchNorm's running mean and variance are buffers, not parameters.
    """

    def __init__(self, batchnorm=True, dropout=DROPOUT):
        super().__init__()
        norm2d, norm1d = (
            (nn.BatchNorm2d, nn.BatchNorm1d) if batchnorm else (nn.Identity, nn.Identity)
        )
        self.bn1, self.bn2 = norm2d(C1), norm2d(C3)
        self.bn3, self.bn4 = norm1d(F5), norm1d(F6)
        self.dropout = nn.Dropout(dropout)

    # BatchNorm2d is slower in channels-last (docs/performance.md).
    memory_format = torch.contiguous_format
    INSIDE = {"conv1": "bn1", "conv2": "bn2"}  # each convolution's maps as BatchNorm leaves them

    def forward(self, x):  # (N, 1, 28, 28)
        x = self.relu(self.pool(self.bn1(self.conv1(x))))  # (N, 6, 14, 14)
        x = self.relu(self.pool(self.bn2(self.conv2(x))))  # (N, 16, 5, 5)
        x = x.flatten(1)  # (N, 400)
        x = self.dropout(self.relu(self.bn3(self.fc1(x))))  # (N, 120)
        x = self.dropout(self.relu(self.bn4(self.fc2(x))))  # (N, 84)
        return self.fc3(x)  # (N, 10)


class CustomMLP(nn.Module):
    """A multilayer perceptron on the 784 pixels, sized to match LeNet-5's parameter count.

    Two hidden layers: almost all of the budget must go to the first layer,
    which sees the pixels, and a second, narrower layer adds depth for little.

    | layer | output | formula          | parameters |
    |-------|--------|------------------|-----------:|
    | fc1   | 75     | (784 + 1) * 75   |     58,875 |
    | fc2   | 32     | (75 + 1) * 32    |      2,432 |
    | fc3   | 10     | (32 + 1) * 10    |        330 |
    | total |        |                  |     61,637 |

    61,637 is 69 fewer than LeNet-5's 61,706 (0.1%).
    """

    memory_format = torch.contiguous_format
    INSIDE = {"fc1": "fc1"}  # the 75 units that see the pixels

    def __init__(self, hidden=(75, 32)):
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_SIDE**2, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], NUM_CLASSES)
        self.relu = nn.ReLU()

    def forward(self, x):  # (N, 1, 28, 28)
        x = x.flatten(1)  # (N, 784)
        x = self.relu(self.fc1(x))  # (N, 75)
        x = self.relu(self.fc2(x))  # (N, 32)
        return self.fc3(x)  # (N, 10)


# The CLI names of the models; main.py and plot.py build models only through this.
MODELS = {"lenet5": LeNet5, "mlp": CustomMLP, "lenet5_reg": LeNet5Regularized}


def num_params(model):
    """Number of trainable parameters (weights and biases; BatchNorm buffers are not counted)."""
    return sum(p.numel() for p in model.parameters())


def inside(model, images):
    """(logits, {layer: its activations after ReLU}) of ``model`` on ``images``, for the layers in
    ``model.INSIDE``: the real intermediate tensors of this forward pass, taken with forward hooks.

    A convolution's maps are shown after ReLU and before pooling (6x28x28 and 16x10x10): the model
    pools first, but max-pooling commutes with ReLU, so these are the maps its pooling reads.
    """
    seen = {}
    hooks = [
        model.get_submodule(module).register_forward_hook(
            lambda m, inputs, output, name=name: seen.__setitem__(name, output.relu())
        )
        for name, module in model.INSIDE.items()
    ]
    try:
        logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


def layer_table(model):
    """(layer name, output shape, own parameter count) for each leaf module, in call order."""
    rows = []
    hooks = [
        module.register_forward_hook(
            lambda m, inputs, output, name=name: rows.append(
                (name, tuple(output.shape[1:]), sum(p.numel() for p in m.parameters()))
            )
        )
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return rows


def format_table(name, model):
    """The printable per-layer table of ``model``; its total is counted from the model itself."""
    rows = layer_table(model)
    lines = [f"{name} ({type(model).__name__})", f"{'layer':<10} {'output':<14} {'params':>8}"]
    lines += [
        f"{layer:<10} {'x'.join(map(str, shape)):<14} {count:>8,}" for layer, shape, count in rows
    ]
    # Modules called more than once (the shared pool and ReLU) hold no parameters,
    # so the rows add up to the model's count.
    lines.append(f"{'total':<25} {sum(count for _, _, count in rows):>8,}")
    return "\n".join(lines)


def parse_args(argv=None):
    return cli.parser("model.py", __doc__).parse_args(cli.arguments(argv))


def main(argv=None):
    parse_args(argv)
    for name, cls in MODELS.items():
        print(format_table(name, cls()), end="\n\n")
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
