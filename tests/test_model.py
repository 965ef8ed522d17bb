import pytest
import torch

import model
from model import (
    DROPOUT,
    MODELS,
    CustomMLP,
    LeNet5,
    LeNet5Regularized,
    format_table,
    inside,
    num_params,
)

LENET5_PARAMS = 61_706


def reference_count(m):
    """Parameters as the classes' docstring tables derive them, counted from the layers' shapes."""
    total = 0
    for layer in m.modules():
        if isinstance(layer, torch.nn.Conv2d):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += (k * layer.in_channels + 1) * layer.out_channels
        elif isinstance(layer, torch.nn.Linear):
            total += (layer.in_features + 1) * layer.out_features
        elif isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            total += 2 * layer.num_features
    return total


def test_lenet5_has_exactly_61706_parameters():
    assert num_params(LeNet5()) == LENET5_PARAMS == reference_count(LeNet5())


def test_regularized_lenet5_adds_452_batchnorm_parameters():
    assert num_params(LeNet5Regularized()) == 62_158 == LENET5_PARAMS + 2 * (6 + 16 + 120 + 84)
    assert num_params(LeNet5Regularized(batchnorm=False)) == LENET5_PARAMS


def test_mlp_is_within_one_percent_of_lenet5():
    count = num_params(CustomMLP())
    assert abs(count - LENET5_PARAMS) <= 0.01 * LENET5_PARAMS
    assert count == reference_count(CustomMLP())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in CustomMLP().modules())


def test_registry_names_the_three_models():
    assert {"lenet5": LeNet5, "mlp": CustomMLP, "lenet5_reg": LeNet5Regularized} == MODELS


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 32])
def test_models_return_float_logits_of_shape_n_by_10(name, n):
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    with torch.no_grad():
        logits = net(torch.randn(n, 1, 28, 28))
    assert logits.shape == (n, 10) and logits.dtype == torch.float32
    # Logits, not probabilities: rows need not be positive or sum to 1.
    assert not torch.allclose(logits.sum(1), torch.ones(n), atol=1e-3)
    assert (logits < 0).any()


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_deterministic_and_train_mode_dropout_is_not(name):
    torch.manual_seed(0)
    net = MODELS[name]()
    x = torch.randn(8, 1, 28, 28)
    net.train()
    net(x)  # moves BatchNorm running stats away from their initial values
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        assert torch.equal(net(x[:1]), net(x[:1]))
    if name == "lenet5_reg":
        net = MODELS[name]().train()  # the default model: Dropout on, as the design asks
        assert net.dropout.p == DROPOUT > 0
        with torch.no_grad():
            assert not torch.equal(net(x), net(x))  # dropout is live in training mode


def test_regularized_eval_uses_running_stats_not_the_batch():
    torch.manual_seed(0)
    net = LeNet5Regularized().eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        alone = net(x[:1])
        in_batch = net(x)[:1]
    assert torch.allclose(alone, in_batch, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_printed_table_adds_up_to_the_model_count(name):
    net = MODELS[name]()
    table = format_table(name, net)
    rows = table.splitlines()[2:-1]
    assert sum(int(row.split()[-1].replace(",", "")) for row in rows) == num_params(net)
    assert table.splitlines()[-1].split() == ["total", f"{num_params(net):,}"]


def test_python_model_py_prints_each_model(capsys):
    model.main()
    out = capsys.readouterr().out
    assert "61,706" in out and "62,158" in out and f"{num_params(CustomMLP()):,}" in out
    assert "16x5x5" in out  # the shape after the second pool


def test_inside_gives_each_layers_activations_after_relu_as_the_forward_pass_computed_them():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    relu, pool = torch.relu, torch.nn.functional.max_pool2d
    lenet, reg, mlp = LeNet5().eval(), LeNet5Regularized().eval(), CustomMLP().eval()
    with torch.no_grad():
        # BatchNorm that does something, so that maps before it would differ
        for bn in (reg.bn1, reg.bn2):
            (
                bn.running_mean.uniform_(-1, 1),
                bn.running_var.uniform_(0.5, 2),
                bn.weight.uniform_(0.5, 2),
            )
        expected = {
            lenet: {"conv1": relu(lenet.conv1(x))},
            reg: {"conv1": relu(reg.bn1(reg.conv1(x)))},
            mlp: {"fc1": relu(mlp.fc1(x.flatten(1)))},
        }
        expected[lenet]["conv2"] = relu(lenet.conv2(pool(expected[lenet]["conv1"], 2)))
        expected[reg]["conv2"] = relu(reg.bn2(reg.conv2(pool(expected[reg]["conv1"], 2))))
        for model, layers in expected.items():
            logits, seen = inside(model, x)
            assert torch.allclose(logits, model(x)) and set(seen) == set(layers)
            for name, values in layers.items():
                assert torch.allclose(seen[name], values, atol=1e-5), (type(model).__name__, name)
            # the hooks are gone afterwards
            assert not any(m._forward_hooks for m in model.modules())
    assert seen["fc1"].shape == (4, 75)
    assert [inside(lenet, x)[1][k].shape for k in ("conv1", "conv2")] == [
        (4, 6, 28, 28),
        (4, 16, 10, 10),
    ]
