"""The frozen VGG16 of the vgg16 study: weights found or one clear error, frozen means
frozen, both heads, ImageNet input. Random weights (--weights none) stand in for ImageNet's,
which cannot be downloaded here; a small input size keeps it fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.cache import sha256_of
from search.models import count_parameters
from search.models import vgg16 as vgg16_module
from search.models.vgg16 import FrozenVGG16, ImageNetInput, WeightsError, resolve_weights
from search.train import DeviceSplit, fit, make_optimizer


@pytest.fixture(scope="module")
def weights():
    return resolve_weights("none", seed=0)


@pytest.fixture(scope="module")
def saved(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(weights.state, path)
    return path


def test_random_weights_are_seeded(weights):
    again = resolve_weights("none", seed=0)
    assert again.sha256 == weights.sha256 and weights.kind == "none"
    assert "seed 0" in weights.source
    other = resolve_weights("none", seed=1)
    assert other.sha256 != weights.sha256


@pytest.mark.parametrize("head", ["exercise", "small"])
def test_frozen_means_frozen(weights, head):
    torch.manual_seed(0)
    model = FrozenVGG16(3, head=head, input_size=32, hidden=16, state=weights.state)
    frozen = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert all(not p.requires_grad for p in model.frozen.parameters())
    optimizer = make_optimizer("sgd", model, 0.1)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.head.parameters()}  # only the head is optimized
    x = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8)
    split = DeviceSplit(x, torch.arange(24) % 3)
    fit(model, nn.CrossEntropyLoss(), optimizer, split, split, epochs=2, batch_size=8, seed=0)
    after = model.frozen.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    trainable, total = count_parameters(model), count_parameters(model, trainable_only=False)
    assert trainable == sum(p.numel() for p in model.head.parameters()) < total


def test_heads_and_feature_widths(weights):
    exercise = FrozenVGG16(10, head="exercise", input_size=32, state=weights.state)
    assert isinstance(exercise.head, nn.Linear) and exercise.head.in_features == 4096
    small = FrozenVGG16(10, head="small", input_size=64, hidden=32, state=weights.state)
    x = torch.rand(2, 1, 28, 28)
    assert small.features(x).shape == (2, 512 * 2 * 2)  # 64 px: a 2x2 map of 512
    assert exercise(x).shape == small(x).shape == (2, 10)
    # train() leaves the frozen part in eval mode: its outputs (the cache) never change
    exercise.train()
    assert not exercise.frozen.training
    assert torch.equal(exercise.features(x), exercise.features(x))


def test_imagenet_input_repeats_resizes_and_normalizes():
    prep = ImageNetInput(32)
    out = prep(torch.full((1, 1, 28, 28), 0.5))
    assert out.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(vgg16_module.IMAGENET_MEAN)) / torch.tensor(
        vgg16_module.IMAGENET_STD)
    assert torch.allclose(out[0, :, 5, 5], expected)
    with pytest.raises(ValueError, match="at least 32"):
        ImageNetInput(16)


def test_imagenet_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(vgg16_module, "_download", lambda url, path: "URLError: offline")
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--weights PATH" in message and "--weights none" in message
    assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing written


def test_imagenet_weights_from_torchvisions_cache(tmp_path, monkeypatch, saved, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = vgg16_module.imagenet_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(saved.read_bytes())
    found = resolve_weights("imagenet")
    assert found.kind == "imagenet" and found.source == str(path)
    assert found.sha256 == sha256_of(saved)
    assert torch.equal(found.state["features.0.weight"], weights.state["features.0.weight"])


def test_weights_from_a_path(saved, weights):
    found = resolve_weights(str(saved))
    assert found.kind == "path" and len(found.sha256) == 64
    assert all(torch.equal(found.state[k], weights.state[k]) for k in weights.state)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_bad_weight_files_are_one_clear_error(tmp_path, saved, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = saved.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="not a readable PyTorch file"):
        resolve_weights(str(tmp_path / "truncated.pth"))
    torch.save({"weights": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused: it holds pickled objects"):
        resolve_weights(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(WeightsError,
                       match=r"not a VGG16 state_dict \(missing classifier.0.bias.*unexpected"):
        resolve_weights(str(tmp_path / "linear.pth"))
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights(str(tmp_path / "nowhere.pth"))


# --- the feature cache -------------------------------------------------------------------


def _features(weights, directory, images):
    from search.features import FeatureCache

    return FeatureCache({"train": images}, "test", weights, directory, torch.device("cpu"))


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def test_features_are_computed_once_then_read(weights, images, tmp_path):
    first = _features(weights, tmp_path, images)
    made = first.get("train", "small", 32)
    assert made.shape == (20, 512) and made.dtype == torch.float16
    assert first.computed == [("train", 32)]
    assert first.get("train", "exercise", 32).shape == (20, 4096)  # made by the same pass
    assert first.computed == [("train", 32)]
    assert first.get("train", "exercise", 32) is first.get("train", "exercise", 32)
    # one head's features in memory: the other head's are read back, not made again
    again = first.get("train", "small", 32)
    assert again is not made and torch.equal(again, made) and first.computed == [("train", 32)]
    second = _features(weights, tmp_path, images)  # another trial process
    assert torch.equal(second.get("train", "small", 32), made) and second.computed == []


@pytest.mark.parametrize("head", ["small", "exercise"])
def test_cached_features_are_what_the_whole_network_computes(weights, images, tmp_path, head):
    """Each cut, against the float32 network on images: float16 storage alone (float32
    backbone) keeps them within 0.1% of the largest feature; the bf16 backbone where the
    machine has native bf16 within 3% (bf16 keeps 8 bits of mantissa through 13 convs)."""
    from search.features import backbone_speed

    cached = _features(weights, tmp_path, images).get("train", head, 32).float()
    model = FrozenVGG16(10, head=head, input_size=32, state=weights.state).eval()
    with torch.inference_mode():
        exact = model.features(images.float() / 255)
    bf16 = backbone_speed(torch.device("cpu")).autocast is not None
    scale = float(exact.abs().max())
    worst = float((cached - exact).abs().max()) / scale
    assert worst <= (0.03 if bf16 else 1e-3), worst
    assert worst > 0 or not bf16  # the comparison sees the precision it claims


def test_a_changed_key_recomputes(weights, images, tmp_path):
    _features(weights, tmp_path, images).get("train", "small", 32)
    other_size = _features(weights, tmp_path, images)
    assert other_size.get("train", "small", 64).shape == (20, 512 * 4)
    assert other_size.computed == [("train", 64)]
    other_weights = _features(resolve_weights("none", seed=1), tmp_path, images)
    other_weights.get("train", "small", 32)
    assert other_weights.computed == [("train", 32)]
    other_pixels = _features(weights, tmp_path, images.flip(0))
    other_pixels.get("train", "small", 32)
    assert other_pixels.computed == [("train", 32)]


@pytest.mark.parametrize("change", ["precision", "resize", "batch"])
def test_features_made_otherwise_are_not_served_from_the_cache(weights, images, tmp_path,
                                                               monkeypatch, change):
    """The backbone's precision (bf16 autocast or not, as the CPU or GPU decides), its input
    preprocessing and its images per pass are in the key: the same images and weights
    made otherwise miss."""
    from search import features as features_module
    from search import train as train_module

    _features(weights, tmp_path, images).get("train", "small", 32)
    if change == "precision":
        native = train_module._cpu_bf16()
        monkeypatch.setattr(train_module, "_cpu_bf16", lambda: not native)
    elif change == "resize":
        monkeypatch.setattr(ImageNetInput, "RESIZE", {"mode": "bicubic",
                                                      "align_corners": False})
    else:
        monkeypatch.setattr(features_module, "BATCH", 7)
    again = _features(weights, tmp_path, images)
    again.get("train", "small", 32)
    assert again.computed == [("train", 32)]


def test_a_corrupted_feature_file_is_recomputed(weights, images, tmp_path):
    expected = _features(weights, tmp_path, images).get("train", "small", 32).clone()
    for stored in tmp_path.glob("*.npy"):
        stored.write_bytes(stored.read_bytes()[:-100])
    again = _features(weights, tmp_path, images)
    assert torch.equal(again.get("train", "small", 32), expected)
    assert again.computed == [("train", 32)]


@pytest.mark.parametrize("input_size", [32, 63])
def test_the_folded_network_computes_what_the_whole_one_does(weights, tmp_path, input_size):
    """Under 64 px the exercise network's classifier[0] folds to 512 -> 4096: the same
    scores on images (PyTorch and ONNX), a model.pt under 150 MB (the whole one is 537 MB)."""
    from search import export

    torch.manual_seed(0)
    whole = FrozenVGG16(10, input_size=input_size, state=weights.state).eval()
    folded = FrozenVGG16(10, input_size=input_size, state=weights.state, fold=True).eval()
    assert folded.folded and not whole.folded
    folded.head.load_state_dict(whole.head.state_dict())
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    x = images.float() / 255
    with torch.inference_mode():
        expected, got = whole(x), folded(x)
        features = whole.features(x)
    assert torch.allclose(folded.features(x), features, rtol=1e-4,
                          atol=1e-5 * float(features.abs().max()))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(got.argmax(1), expected.argmax(1))
    removed = count_parameters(whole, trainable_only=False) - count_parameters(
        folded, trainable_only=False)
    assert removed == 4096 * (25088 - 512)
    torch.save(folded.state_dict(), tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size < 150 * 2**20
    export.export_onnx(folded, tmp_path / "model.onnx", x[:2])
    checked = export.check_onnx(tmp_path / "model.onnx", folded, images)
    assert checked["same_predictions"] and checked["max_abs_diff"] <= export.ONNX_ATOL


def test_only_the_exercise_network_under_64_px_folds(weights):
    assert not FrozenVGG16(10, input_size=64, state=weights.state, fold=True).folded
    assert not FrozenVGG16(10, head="small", input_size=32, hidden=8, state=weights.state,
                           fold=True).folded


def test_the_backbone_is_timed_after_a_warm_up_pass(weights, images, monkeypatch):
    from search import features as features_module

    passes = []
    monkeypatch.setattr(features_module, "run_backbone",
                        lambda w, x, size, device, desc="": passes.append((len(x), desc)))
    ms = features_module.backbone_ms_per_image(weights, 32, images, torch.device("cpu"), n=16)
    assert passes == [(8, "(warm-up)"), (16, "(timing)")] and ms >= 0
