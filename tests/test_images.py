"""Your own images: `--data PATH` with a folder (grayscale, colour, mixed sizes, given splits)
or an .npz, through every study, cached, refused on changed data, reloaded as trained."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search import data as data_module
from search import evaluate as evaluate_module
from search import images as images_module
from search.config import RunConfig
from search.errors import ConfigError, DataError
from search.export import load_model
from search.final import run_final
from search.run import search

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 40), "blue": (40, 40, 200)}


def colour_folder(root: Path, per_class: int = 24, mixed: bool = True, seed: int = 0) -> Path:
    """Colour PNGs (and JPEGs) of three classes by their hue, of mixed sizes, with a file
    that is not an image in each class folder."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(20, 40)) if mixed else 24
            pixels = (rng.normal(0, 25, (side, side + 2, 3)) + colour).clip(0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))
            image.save(folder / f"{i}.jpg" if i % 4 == 0 else folder / f"{i}.png")
        (folder / "labels.txt").write_text("not an image", encoding="utf-8")
    return root


def gray_folder(root: Path, train: int = 18, test: int = 6) -> Path:
    """Grayscale 16 x 16 PNGs of three classes (a bright row at a class's height) in train/
    and test/ folders."""
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("test", test)):
        for label in range(3):
            folder = root / split / f"row{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16)).astype(np.uint8)
                pixels[4 + 4 * label] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def npz_file(path: Path, n: int = 60, colour: bool = True) -> Path:
    rng = np.random.default_rng(2)
    y = np.arange(n) % 3
    x = rng.integers(0, 50, (n, 12, 12, 3) if colour else (n, 12, 12)).astype(np.uint8)
    x[np.arange(n), 2 + 3 * y] = 255  # a bright row per class
    cut = n * 3 // 4
    np.savez(path, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:],
             class_names=np.array(["top", "middle", "bottom"]))
    return path


def _cfg(tmp_path: Path, study: str, data: Path, **more) -> RunConfig:
    return RunConfig(study=study, data=str(data), n_trials=2, epochs=2, batch_size=16,
                     storage=f"sqlite:///{tmp_path / 'studies.db'}", final_seeds=1,
                     runs_dir=str(tmp_path / "runs"), **more)


def _end_to_end(cfg: RunConfig) -> dict:
    """Search, final step, reload, ONNX, report; returns model.json."""
    study, opened, dataset = search(cfg)
    outcome = run_final(study, cfg, opened, dataset)
    for name in ("model.pt", "model.json", "model.onnx", "report.md", "report.html"):
        assert (outcome.directory / name).is_file(), name
    assert outcome.onnx["max_abs_diff"] < 1e-3
    return json.loads((outcome.directory / "model.json").read_text(encoding="utf-8"))


def test_a_folder_of_grayscale_pngs_with_its_own_splits(tmp_path):
    info = _end_to_end(_cfg(tmp_path, "cnn", gray_folder(tmp_path / "rows")))
    assert info["input"]["shape"] == [1, 16, 16]
    assert info["classes"] == ["row0", "row1", "row2"]
    assert info["data"]["n_test"] == 18  # test/ as given
    assert info["data"]["images"]["test_split"] == "test/ folder"


@pytest.mark.parametrize("study,extra", [("cnn", {}), ("mlp", {}),
                                         ("vgg16", {"weights": "none"})])
def test_a_colour_folder_of_mixed_sizes_runs_every_study(tmp_path, study, extra):
    folder = colour_folder(tmp_path / "hues")
    info = _end_to_end(_cfg(tmp_path, study, folder, **extra))
    assert info["input"]["shape"] == [3, 32, 32]  # mixed sizes: 32 px, stated
    assert info["classes"] == sorted(COLOURS)
    assert info["data"]["images"]["size"] == [32, 32]
    assert info["data"]["images"]["channels"] == 3
    # the test split was carved off: a fifth of each class
    assert info["data"]["n_test"] == 3 * round(24 * 0.2)
    report = (tmp_path / "runs" / f"{study}-hues" / "report.md").read_text(encoding="utf-8")
    assert "0.2 of each class" in report and "32 x 32" in report


def test_an_npz_file_with_class_names(tmp_path, capsys):
    cfg = _cfg(tmp_path, "cnn", npz_file(tmp_path / "rows.npz"), image_size=16, channels=1)
    info = _end_to_end(cfg)
    assert info["input"]["shape"] == [1, 16, 16]
    assert info["classes"] == ["top", "middle", "bottom"]
    # search.evaluate reads the npz again as the model was trained on it: the same numbers
    model = tmp_path / "runs" / "cnn-rows" / "model.pt"
    assert evaluate_module.main([str(model)]) == 0
    out = capsys.readouterr().out
    assert "middle" in out and f"{info['metrics']['test_accuracy']:.4f}" in out


def test_a_new_image_file_is_classified_as_the_final_step_scored_it(tmp_path):
    folder = colour_folder(tmp_path / "hues", per_class=12)
    cfg = _cfg(tmp_path, "cnn", folder)
    study, opened, dataset = search(cfg)
    outcome = run_final(study, cfg, opened, dataset)
    loaded = load_model(outcome.directory / "model.pt")
    path = folder / "green" / "5.png"
    x = images_module.read_image(path, loaded.info)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 3, 32, 32)
    # the same pixels the data set holds for that file
    listing = images_module.scan(folder)
    size = tuple(loaded.info["input"]["shape"][1:])
    assert torch.equal(x[0], torch.from_numpy(images_module.decode_one(path, size, 3)))
    assert listing.classes[int(loaded.model(x.float() / 255).argmax())] in COLOURS


def test_the_second_load_decodes_nothing_and_a_changed_file_is_read_again(tmp_path,
                                                                          monkeypatch):
    folder = colour_folder(tmp_path / "hues", per_class=8, mixed=False)
    first = data_module.load(str(folder))
    calls = []
    decode = images_module.decode
    monkeypatch.setattr(images_module, "decode", lambda *a, **k: calls.append(1) or decode(
        *a, **k))
    second = data_module.load(str(folder))
    assert not calls and second.digest == first.digest
    image = folder / "red" / "1.png"
    Image.fromarray(np.zeros((24, 26, 3), np.uint8)).save(image)
    os.utime(image, ns=(1, 1))  # another modification time, whatever the clock
    third = data_module.load(str(folder))
    assert calls and third.digest != first.digest


def test_resuming_on_changed_images_is_refused(tmp_path):
    folder = colour_folder(tmp_path / "hues", per_class=10, mixed=False)
    cfg = _cfg(tmp_path, "mlp", folder, final=False)
    search(cfg)
    image = folder / "blue" / "3.png"  # same count, other pixels
    Image.fromarray(np.full((24, 26, 3), 255, np.uint8)).save(image)
    os.utime(image, ns=(2, 2))
    with pytest.raises(ConfigError, match="new --study-name"):
        search(cfg)


def test_options_choose_size_and_channels(tmp_path):
    folder = colour_folder(tmp_path / "hues", per_class=8)
    dataset = data_module.load(str(folder), images=data_module.ImageOptions(image_size=20,
                                                                             channels=1))
    assert dataset.image_shape == (1, 20, 20)
    assert not dataset.notes  # the size was asked for: nothing to say
    same = data_module.load(str(folder), images=data_module.ImageOptions(test_fraction=0.25))
    assert len(same.test) == 3 * round(8 * 0.25) and same.image_shape == (3, 32, 32)
    assert "32 x 32" in same.notes[0]


def test_gray_npz_is_colour_on_request_and_colour_is_gray_with_pillows_weights(tmp_path):
    gray = data_module.load(str(npz_file(tmp_path / "g.npz", colour=False)),
                            images=data_module.ImageOptions(channels=3))
    assert gray.image_shape == (3, 12, 12)
    assert torch.equal(gray.train.x[:, 0], gray.train.x[:, 2])
    rgb = np.array([[[[10, 200, 30]]]], np.uint8)  # one 1 x 1 colour pixel
    expected = np.asarray(Image.fromarray(rgb[0]).convert("L"))[0, 0]
    assert images_module.convert_array(rgb, 1, (1, 1))[0, 0, 0, 0] == expected


def test_parallel_decoding_gives_the_same_pixels(tmp_path):
    folder = colour_folder(tmp_path / "hues", per_class=6)
    names = [f.path for f in images_module.scan(folder).files]
    one, kept_one = images_module.decode(folder, names, (20, 20), 3, processes=1)
    two, kept_two = images_module.decode(folder, names, (20, 20), 3, processes=2)
    assert np.array_equal(one, two) and kept_one == kept_two == list(range(len(names)))


def test_skip_bad_images_logs_each_and_goes_on(tmp_path, caplog):
    folder = colour_folder(tmp_path / "hues", per_class=8, mixed=False)
    (folder / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png.*--skip-bad-images"):
        data_module.load(str(folder))
    dataset = data_module.load(str(folder), images=data_module.ImageOptions(skip_bad=True))
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 24
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_a_set_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    folder = colour_folder(tmp_path / "hues", per_class=4, mixed=False)
    monkeypatch.setattr(images_module, "available_memory", lambda: 10_000)
    monkeypatch.setattr(images_module, "decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DataError, match="GB available; give a smaller --image-size"):
        data_module.load(str(folder), images=data_module.ImageOptions(image_size=512))


def test_a_decompression_bomb_is_refused_before_its_pixels(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 300)).save(path)  # a small file of 120,000 pixels
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(DataError, match="400 x 300 pixels.*too large to decode safely"):
        images_module.decode_one(path, (16, 16), 1)


def test_model_json_records_how_to_read_an_image(tmp_path):
    folder = colour_folder(tmp_path / "hues", per_class=12)
    cfg = dataclasses.replace(_cfg(tmp_path, "mlp", folder), image_size=24)
    info = _end_to_end(cfg)
    images = info["data"]["images"]
    assert (images["size"], images["channels"], images["filter"]) == ([24, 24], 3, "bilinear")
    assert images["options"]["image_size"] == 24 and info["input"]["shape"] == [3, 24, 24]


def test_final_and_replay_read_the_folder_again_as_the_study_recorded(tmp_path, capsys):
    from search import final as final_module
    from search import replay as replay_module

    folder = colour_folder(tmp_path / "hues", per_class=12)
    cfg = _cfg(tmp_path, "mlp", folder, final=False, image_size=20)
    search(cfg)
    common = ["--study-name", "mlp-hues", "--storage", cfg.storage]
    assert final_module.main([*common, "--final-seeds", "1", "--runs-dir",
                              str(tmp_path / "runs")]) == 0
    info = json.loads((tmp_path / "runs" / "mlp-hues" / "model.json").read_text("utf-8"))
    assert info["input"]["shape"] == [3, 20, 20]
    assert replay_module.main([*common, "--trial", "0"]) == 0
    assert ": equal" in capsys.readouterr().out
