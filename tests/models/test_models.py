from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from er_lightning.models import (
    MODEL_NAMES,
    VGG,
    ResNet20,
    ResNetCIFAR,
    SmallCNN,
    create_model,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    small_cnn,
    vgg16,
    vgg19,
)


def weight_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The 2-D/4-D parameters (what upstream masks), in named_parameters() order."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() in (2, 4)]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: CI's two cores are often shared by several test processes, and oversubscribed
    # OpenMP threads stall (the digits test, 3 × 0.1 s epochs, once took 21 s that way).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "num_classes", "tensors", "total"),
    [
        ("resnet18", 10, 21, 11_164_352),
        ("vgg16", 10, 14, 14_715_584),
        ("resnet50", 100, 54, 23_652_032),
        ("resnet20", 10, 22, 270_896),
    ],
)
def test_upstream_weight_counts(name: str, num_classes: int, tensors: int, total: int) -> None:
    shapes = weight_shapes(create_model(name, num_classes))
    assert len(shapes) == tensors
    assert sum(math.prod(s) for _, s in shapes) == total


def test_resnet18_names_and_shapes() -> None:
    model = resnet18(10)
    shapes = dict(weight_shapes(model))
    names = list(shapes)
    assert names[0] == "conv1.weight"
    assert names[-1] == "classifier.weight"
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["layer2.0.shortcut.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer3.0.shortcut.0.weight"] == (256, 128, 1, 1)
    assert shapes["layer4.0.shortcut.0.weight"] == (512, 256, 1, 1)
    assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["classifier.weight"] == (10, 512)
    # Shortcut sits after conv2 in module order (upstream's pyramid ordering relies on it).
    assert names.index("layer2.0.shortcut.0.weight") == names.index("layer2.0.conv2.weight") + 1
    assert not any(n.startswith("layer1.0.shortcut") for n, _ in model.named_parameters())
    assert model.classifier.bias is None
    assert model.conv1.bias is None and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[1].conv1.stride == (1, 1)
    assert isinstance(model.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet50_names_and_shapes() -> None:
    model = resnet50(100)
    shapes = dict(weight_shapes(model))
    assert shapes["layer1.0.shortcut.0.weight"] == (256, 64, 1, 1)  # 64 != 256: projection in stage 1 too
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["classifier.weight"] == (100, 2048)
    # Bottleneck: the stride sits on the 3×3 conv.
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].shortcut[0].stride == (2, 2)


def test_resnet34_layout() -> None:
    model = resnet34(10)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert len(weight_shapes(model)) == 1 + 2 * 16 + 3 + 1


def test_vgg16_names_and_shapes() -> None:
    model = vgg16(10)
    shapes = weight_shapes(model)
    expected = [f"feature.{i}.weight" for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)]
    assert [n for n, _ in shapes] == [*expected, "classifier.weight"]
    assert dict(shapes)["feature.0.weight"] == (64, 3, 3, 3)
    assert dict(shapes)["feature.40.weight"] == (512, 512, 3, 3)
    assert dict(shapes)["classifier.weight"] == (10, 512)
    assert model.classifier.bias is not None and model.classifier.bias.shape == (10,)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.feature) == 4
    assert isinstance(model.feature[-1], nn.ReLU)  # no pool after the last block


def test_vgg19_layout() -> None:
    model = vgg19(100)
    convs = [m for m in model.feature if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert len(weight_shapes(model)) == 17


def test_resnet20_names_and_shapes() -> None:
    model = resnet20(10)
    shapes = dict(weight_shapes(model))
    assert shapes["conv1.weight"] == (16, 3, 3, 3)
    assert shapes["layer2.0.shortcut.0.weight"] == (32, 16, 1, 1)
    assert shapes["layer3.0.shortcut.0.weight"] == (64, 32, 1, 1)
    assert shapes["fc.weight"] == (10, 64)
    assert model.fc.bias is not None
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert model.layer2[0].shortcut[0].stride == (2, 2)


@pytest.mark.parametrize("factory", [resnet18, vgg16, resnet20])
def test_forward_cifar_logits(factory) -> None:
    model = factory(10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # Logits, not log-probabilities: rows of exp(out) do not sum to 1.
    assert not torch.allclose(torch.logsumexp(out, dim=1), torch.zeros(2), atol=1e-3)


@pytest.mark.parametrize("factory", [resnet18, vgg16, resnet20, resnet50])
def test_tiny_imagenet_shapes(factory) -> None:
    cifar = weight_shapes(factory(10))
    tiny_model = factory(200, input_size=64)
    tiny = weight_shapes(tiny_model)
    assert [n for n, _ in tiny] == [n for n, _ in cifar]
    assert tiny[:-1] == cifar[:-1]  # only the classifier differs
    assert tiny[-1][1][0] == 200 and tiny[-1][1][1:] == cifar[-1][1][1:]
    assert tiny_model.input_shape == (3, 64, 64)
    if factory is not resnet50:  # a full-size ResNet-50 forward is too slow for the default run
        tiny_model.eval()
        with torch.no_grad():
            assert tiny_model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "resnet20", "small_cnn"])
def test_bn_affine_false_has_no_bn_parameters(name: str) -> None:
    model = create_model(name, 10, bn_affine=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    assert all(not m.affine and m.weight is None and m.bias is None for m in bns)
    assert all(m.running_mean is not None for m in bns)  # running statistics are still tracked
    n_bn_params = sum(1 for m in bns for _ in m.parameters(recurse=False))
    assert n_bn_params == 0
    # Only conv/linear weights (and the classifier bias where upstream has one) remain.
    extra = {n for n, p in model.named_parameters() if p.dim() not in (2, 4)}
    assert extra <= {"classifier.bias", "fc.bias"}
    assert weight_shapes(model) == weight_shapes(create_model(name, 10))


def test_bias_true_adds_conv_biases() -> None:
    model = resnet18(10, bias=True, bn_affine=False)  # ER_SLT's supermask ResNet-18
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert all(m.bias is not None and m.bias.shape == (m.out_channels,) for m in convs)
    assert model.classifier.bias is not None and model.classifier.bias.shape == (10,)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 21
    assert weight_shapes(model) == weight_shapes(resnet18(10))


@pytest.mark.parametrize("factory", [vgg16, resnet20])
def test_bias_true_on_vgg_and_resnet20(factory) -> None:
    model = factory(10, bias=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None for m in convs)
    if factory is vgg16:
        assert all(float(m.bias.detach().abs().sum()) == 0.0 for m in convs)  # upstream zeroes conv biases


@pytest.mark.parametrize("train", [True, False])
def test_conv1x1_classifier_batch_size_one(train: bool) -> None:
    model = resnet18(10, classifier="conv1x1")
    assert isinstance(model.classifier, nn.Conv2d)
    assert model.classifier.weight.shape == (10, 512, 1, 1)
    assert model.classifier.bias is None
    assert len(weight_shapes(model)) == 21
    model.train(train)
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)  # upstream STR squeezed to (10,)


def test_conv1x1_classifier_equals_linear() -> None:
    linear = resnet18(10).eval()
    conv = resnet18(10, classifier="conv1x1").eval()
    state = linear.state_dict()
    state["classifier.weight"] = state["classifier.weight"][:, :, None, None]
    conv.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), linear(x))


def test_conv1x1_classifier_resnet50_and_others() -> None:
    assert resnet50(100, classifier="conv1x1").classifier.weight.shape == (100, 2048, 1, 1)
    vgg = vgg16(10, classifier="conv1x1").eval()
    assert vgg.classifier.weight.shape == (10, 512, 1, 1)
    assert vgg(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    r20 = resnet20(10, classifier="conv1x1").eval()
    assert r20.fc.weight.shape == (10, 64, 1, 1)
    assert r20(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_in_channels_option() -> None:
    assert resnet18(10, in_channels=1).conv1.weight.shape == (64, 1, 3, 3)
    assert vgg16(10, in_channels=1).feature[0].weight.shape == (64, 1, 3, 3)
    assert resnet20(10, in_channels=1).conv1.weight.shape == (16, 1, 3, 3)


def test_model_names_and_registry() -> None:
    assert isinstance(MODEL_NAMES, tuple)
    assert set(MODEL_NAMES) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet20",
        "vgg16",
        "vgg19",
        "small_cnn",
        "transformer_lm",
        "vit",
    }
    assert isinstance(create_model("ResNet18", 10), ResNetCIFAR)  # upstream's spelling works too
    assert isinstance(create_model("vgg19", 10), VGG)
    assert isinstance(create_model("resnet20", 10), ResNet20)
    assert isinstance(create_model("small_cnn", 10), SmallCNN)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet101'") as info:
        create_model("resnet101", 10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(TypeError, match="classifier") as info:
        create_model("small_cnn", 10, classifier="conv1x1")
    assert "bn_affine" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"classifier": "mlp"}, ValueError, r"classifier must be one of \['linear', 'conv1x1'\]"),
        ({"bn_affine": "False"}, TypeError, "bn_affine must be True or False"),
        ({"bias": 1}, TypeError, "bias must be True or False"),
        ({"in_channels": 0}, ValueError, "in_channels must be an int >= 1, got 0"),
        ({"input_size": 32.0}, TypeError, "input_size must be an int"),
    ],
)
@pytest.mark.parametrize("factory", [resnet18, vgg16, resnet20])
def test_bad_options_raise(factory, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        factory(10, **kwargs)


def test_bad_counts_and_depths_raise() -> None:
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        resnet18(0)
    with pytest.raises(TypeError, match="num_classes"):
        vgg16(True)
    with pytest.raises(ValueError, match="input_size must be an int >= 16, got 8"):
        vgg16(10, input_size=8)
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50\], got 101"):
        ResNetCIFAR(101)
    with pytest.raises(ValueError, match=r"depth must be one of \[11, 13, 16, 19\]"):
        VGG(15)
    with pytest.raises(ValueError, match="channels must be a pair"):
        small_cnn(10, channels=(8,))


@torch.no_grad()
def test_vgg_default_init() -> None:
    model = vgg16(10)
    w = model.feature[40].weight
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)  # fan_out
    assert float(model.feature[0].weight.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    assert float(model.classifier.weight.std()) == pytest.approx(0.01, rel=0.1)
    assert float(model.classifier.bias.abs().sum()) == 0.0
    assert torch.all(model.feature[41].weight == 1) and torch.all(model.feature[41].bias == 0)


@torch.no_grad()
def test_resnet20_default_init() -> None:
    model = resnet20(10)
    w = model.layer3[1].conv1.weight
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)  # fan_in, ReLU gain
    assert float(model.conv1.weight.std()) == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    assert float(model.fc.weight.std()) == pytest.approx(math.sqrt(2 / 64), rel=0.15)


@torch.no_grad()
def test_resnet18_keeps_pytorch_default_init() -> None:
    model = resnet18(10)
    w = model.layer4[1].conv2.weight  # Kaiming-uniform a=sqrt(5): U(±1/sqrt(fan_in))
    bound = 1 / math.sqrt(512 * 9)
    assert float(w.abs().max()) <= bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert float(model.classifier.weight.abs().max()) <= 1 / math.sqrt(512)


def test_small_cnn_shapes() -> None:
    model = small_cnn(10)
    assert weight_shapes(model) == [
        ("conv1.weight", (32, 1, 3, 3)),
        ("conv2.weight", (64, 32, 3, 3)),
        ("classifier.weight", (10, 64 * 4 * 4)),
    ]
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    assert small_cnn(3, input_size=12, channels=(4, 8)).classifier.weight.shape == (3, 8 * 6 * 6)


def test_small_cnn_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    model = small_cnn(10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        model.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy >= 0.9
