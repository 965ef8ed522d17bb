"""predict.py: MNIST's preprocessing for any image, the command line, the endpoint, and the page in
a real browser."""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bomb_png, png_bytes
from PIL import Image, ImageDraw

import dataset
import files
import main
import predict
import preprocess
import runs
from model import LeNet5
from preprocess import ImageInputError


def centre_of_mass(view):
    view = view.astype(float)
    return (view.sum(1) * np.arange(28)).sum() / view.sum(), (
        view.sum(0) * np.arange(28)
    ).sum() / view.sum()


def ink_extent(view):
    rows, cols = np.nonzero(view > 0)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


@pytest.fixture(scope="module")
def test_digits(mnist_dir):
    """(uint8 images, labels) of the real test split."""
    split = dataset.MNIST(mnist_dir / "test.tar")
    return split.images.numpy(), split.labels.numpy()


# ------------------------------------------------------------ preprocessing


def test_dark_ink_on_a_light_uneven_page_gives_the_same_digit_as_mnist(test_digits):
    digit = test_digits[0][0]
    _, plain = preprocess.to_mnist(Image.fromarray(digit))
    # light, with a shadow on one side
    page = np.full((120, 100), 190.0) + np.linspace(-60, 60, 100)[None, :]
    page[30:86, 20:76] -= (
        np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.LANCZOS)) * 0.7
    )
    _, photographed = preprocess.to_mnist(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)))
    assert np.abs(plain.astype(int) - photographed.astype(int)).mean() < 8  # of 255, per pixel
    assert ink_extent(photographed) == ink_extent(plain)


def test_the_ink_is_cropped_fitted_into_20_pixels_keeping_its_aspect_and_centred_by_mass():
    canvas = np.zeros((300, 400), np.uint8)
    canvas[40:140, 300:320] = 255  # a bar 100 tall and 20 wide, far from the centre
    _, view = preprocess.to_mnist(Image.fromarray(canvas))
    assert ink_extent(view) == (20, 4)
    assert centre_of_mass(view) == pytest.approx((14, 14), abs=0.5)
    wide = np.zeros((50, 50), np.uint8)
    wide[10:14, 3:43] = 255  # 40 wide, 4 tall: the longer side is the width
    assert ink_extent(preprocess.to_mnist(Image.fromarray(wide))[1]) == (2, 20)


def test_an_mnist_digit_passes_through_nearly_unchanged(test_digits):
    images, _ = test_digits
    for digit in images[:50]:
        tensor, view = preprocess.to_mnist(Image.fromarray(digit))
        assert np.abs(view.astype(int) - digit.astype(int)).mean() < 6
        assert tensor.shape == (1, 1, 28, 28)
        assert torch.allclose(
            tensor, dataset.normalize(dataset.to_unit(torch.from_numpy(view)[None]))
        )


def test_transparency_is_paper_and_colour_is_read_as_grey():
    rgba = np.zeros((60, 60, 4), np.uint8)  # a transparent canvas
    rgba[10:50, 28:33] = (200, 30, 30, 255)  # an opaque red stroke
    image = preprocess.open_image(png_bytes(rgba, "RGBA"))
    assert image.mode == "L" and image.getpixel((0, 0)) == 255
    assert ink_extent(preprocess.to_mnist(image)[1]) == (20, 3)


@pytest.mark.parametrize("noise", [0, 12])
def test_a_blank_image_holds_no_digit(noise):
    page = np.full((80, 80), 230.0) + np.random.default_rng(0).normal(0, noise, (80, 80))
    with pytest.raises(ImageInputError, match="no ink found"):
        preprocess.to_mnist(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)))


# ------------------------------------------------------------ accuracy on real digits


def test_the_test_pngs_through_the_preprocessing_score_as_main_py_reported(
    one_epoch_run, mnist_dir
):
    model, final = runs.load_model(one_epoch_run / "lenet5")
    images, labels = [], []
    for name, data in dataset._iter_tar(mnist_dir / "test.tar"):
        images.append(preprocess.to_mnist(preprocess.open_image(data))[0])
        labels.append(int(Path(name).stem.split("_")[1]))
    with torch.inference_mode():
        predicted = torch.cat([model(batch).argmax(1) for batch in torch.cat(images).split(1000)])
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert len(labels) == 10_000 and abs(accuracy - final["test_acc"]) <= 0.003


def photographed(digit, rng):
    """An MNIST digit re-drawn as dark ink on a light, noisy, unevenly lit page, saved as a JPEG."""
    side = int(rng.integers(60, 201))
    height, width = side, int(side * rng.uniform(0.75, 1.33))
    # the digit's 20 rows take 30-80% of the page
    size = max(2, int(height * rng.uniform(0.3, 0.8) * 28 / 20))
    ink = (
        np.asarray(
            Image.fromarray(digit).resize((size, size), Image.Resampling.LANCZOS), np.float32
        )
        / 255
    )
    page = rng.uniform(170, 235) + rng.uniform(-20, 20) * np.linspace(-1, 1, width)[None, :]
    page = page + rng.normal(0, rng.uniform(2, 8), (height, width))
    top, left = (
        rng.integers(0, max(1, height - size + 1)),
        rng.integers(0, max(1, width - size + 1)),
    )
    patch = page[top : top + size, left : left + size]
    patch -= ink[: patch.shape[0], : patch.shape[1]] * rng.uniform(120, 170)
    buf = io.BytesIO()
    Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).convert("RGB").save(
        buf, format="JPEG", quality=85
    )
    return buf.getvalue()


def test_photographed_pages_lose_at_most_a_point_of_accuracy(one_epoch_run, test_digits):
    images, labels = test_digits
    model, _ = runs.load_model(one_epoch_run / "lenet5")
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(labels), 400, replace=False)
    pages = [
        preprocess.to_mnist(preprocess.open_image(photographed(images[i], rng)))[0] for i in chosen
    ]
    plain = dataset.normalize(dataset.to_unit(torch.from_numpy(images[chosen])))
    with torch.inference_mode():
        page_acc = (model(torch.cat(pages)).argmax(1).numpy() == labels[chosen]).mean()
        plain_acc = (model(plain).argmax(1).numpy() == labels[chosen]).mean()
    assert plain_acc > 0.95 and page_acc >= plain_acc - 0.01


# ------------------------------------------------------------ the command line


@pytest.fixture
def images(tmp_path, test_digits):
    folder = tmp_path / "images"
    folder.mkdir()
    digits, labels = test_digits
    (folder / "seven.png").write_bytes(png_bytes(digits[0]))  # a 7
    (folder / "photo.jpg").write_bytes(photographed(digits[1], np.random.default_rng(1)))  # a 2
    (folder / "blank.png").write_bytes(png_bytes(np.full((40, 40), 255)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "bomb.png").write_bytes(bomb_png())
    assert (labels[0], labels[1]) == (7, 2)
    return folder


def test_each_image_gets_each_models_digit_and_top_three(one_epoch_run, images, capsys):
    files = [images / "seven.png", images / "photo.jpg"]
    assert predict.main([*map(str, files), "--run", str(one_epoch_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(files[0]) and lines[4] == str(files[1])
    for line, name, digit in zip(
        lines[1:4] + lines[5:8],
        ["lenet5", "mlp", "lenet5_reg"] * 2,
        [7] * 3 + [2] * 3,
        strict=False,
    ):
        assert line.split()[:2] == [name, str(digit)] and line.count("%") == 3


def test_json_gives_ten_probabilities_per_model_and_view_writes_what_the_models_saw(
    one_epoch_run, images, tmp_path, capsys
):
    argv = [
        str(images / "seven.png"),
        str(images / "blank.png"),
        "--run",
        str(one_epoch_run),
        "--model",
        "lenet5",
    ]
    assert predict.main([*argv, "--json", "--view", str(tmp_path / "views")]) == 1
    good, bad = map(json.loads, capsys.readouterr().out.splitlines())
    assert good["image"] == str(images / "seven.png") and list(good["models"]) == ["lenet5"]
    lenet5 = good["models"]["lenet5"]
    assert lenet5["digit"] == 7 and len(lenet5["probs"]) == 10 and lenet5["is_digit"] is True
    assert sum(lenet5["probs"]) == pytest.approx(1, abs=1e-5)
    assert lenet5["confidence"] == pytest.approx(max(lenet5["probs"]))
    assert bad == {
        "image": str(images / "blank.png"),
        "error": "no ink found: the image is empty or blank",
    }
    with Image.open(tmp_path / "views/seven.png") as view:
        assert view.size == (28, 28) and view.mode == "L"


def test_several_seeds_of_a_model_are_averaged(one_epoch_run, images, tmp_path):
    run = tmp_path / "seeds"
    config = json.loads((one_epoch_run / "config.json").read_text())
    files.write_json(
        run / "config.json", {**config, "model": ["lenet5"], "seeds": [0, 1], "per_seed": True}
    )
    for seed in (0, 1):
        shutil.copytree(one_epoch_run / "lenet5", run / "lenet5" / f"seed{seed}")
    last = torch.load(one_epoch_run / "lenet5/last.pt", weights_only=True)
    torch.manual_seed(1)
    # a seed that answers otherwise
    torch.save({**last, "model": LeNet5().state_dict()}, run / "lenet5/seed1/last.pt")
    # not a job of the run: left out
    shutil.copytree(run / "lenet5/seed0", run / "lenet5.moved/seed0")
    models = predict.load_models(run)
    assert list(models) == ["lenet5"] and len(models["lenet5"]) == 2
    image, _ = preprocess.to_mnist(Image.open(images / "seven.png"))
    each = [
        predict.classify({"lenet5": [model]}, image)["lenet5"]["probs"]
        for model in models["lenet5"]
    ]
    assert each[0] != pytest.approx(each[1])
    assert predict.classify(models, image)["lenet5"]["probs"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(*each, strict=False)]
    )


def test_a_model_that_refuses_says_not_a_digit_with_its_closest_guess(
    one_epoch_run, images, monkeypatch, capsys
):
    load_models = predict.load_models

    def strict(*args, **kwargs):  # lenet5's rule with a threshold no cosine similarity reaches
        models = load_models(*args, **kwargs)
        models["lenet5"][0].rule["thresholds"]["nearest"] = 1.5
        return models

    monkeypatch.setattr(predict, "load_models", strict)
    seven = str(images / "seven.png")
    assert predict.main([seven, "--run", str(one_epoch_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"  lenet5      not a digit \(closest: 7, \d+%\)", lines[1])
    assert re.fullmatch(r"  mlp         7  \(7: .*\)", lines[2])
    assert predict.main([seven, "--run", str(one_epoch_run), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["models"]
    assert answer["lenet5"]["is_digit"] is False and answer["lenet5"]["digit"] == 7
    assert answer["mlp"]["is_digit"] is True


def test_a_run_made_before_rules_still_answers_says_so_once_and_resume_adds_them(
    one_epoch_run, images, tmp_path, capsys
):
    old = shutil.copytree(one_epoch_run, tmp_path / "old")
    for name in ("lenet5", "mlp", "lenet5_reg"):
        (old / name / "rule.pt").unlink()
    argv = [str(images / "seven.png"), str(images / "photo.jpg"), "--run", str(old), "--json"]
    assert predict.main(argv) == 0
    out, err = capsys.readouterr()
    assert err == (
        f"warning: {old}: made before not-a-digit rules, so lenet5, mlp, lenet5_reg cannot refuse"
        f" an image; python main.py --resume {old} adds them\n"
    )
    answers = [json.loads(line)["models"] for line in out.splitlines()]
    assert [a["lenet5"]["digit"] for a in answers] == [7, 2]
    assert all(result["is_digit"] for a in answers for result in a.values())
    assert main.main(["--resume", str(old), "--quiet"]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert all((old / name / "rule.pt").is_file() for name in ("lenet5", "mlp", "lenet5_reg"))
    assert predict.main(argv) == 0 and capsys.readouterr().err == ""


def test_bad_images_are_one_line_each_and_the_others_still_answered(one_epoch_run, images, capsys):
    names = ["notes.png", "empty.png", "seven.png", "blank.png", "bomb.png", "missing.png"]
    assert predict.main([*(str(images / n) for n in names), "--run", str(one_epoch_run)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == str(images / "seven.png")
    reasons = {
        "notes.png": "not an image",
        "empty.png": "not an image",
        "blank.png": "no ink found",
        "bomb.png": "an absurd pixel count",
        "missing.png": "No such file or directory",
    }
    lines = err.splitlines()
    assert len(lines) == len(reasons) and "Traceback" not in err
    for line, (name, reason) in zip(lines, reasons.items(), strict=False):
        assert line.startswith(f"error: {images / name}: {reason}") and line.endswith(
            "; nothing predicted"
        )


def test_a_run_without_checkpoints_or_with_an_unknown_model_is_one_line(
    one_epoch_run, images, tmp_path, capsys
):
    (tmp_path / "empty_run/lenet5").mkdir(parents=True)
    untrained = shutil.copytree(one_epoch_run, tmp_path / "untrained_run")
    for name in ("lenet5", "mlp", "lenet5_reg"):
        (untrained / name / "last.pt").unlink()
    foreign = shutil.copytree(one_epoch_run, tmp_path / "foreign_run")
    torch.save({"epoch": 1, "model": {"fc9.weight": torch.zeros(1)}}, foreign / "mlp/last.pt")
    cases = {
        tmp_path
        / "empty_run": "no config.json, so not a run of main.py; train first: python main.py",
        untrained: "no trained model in it; train first: python main.py",
        foreign: f"{foreign / 'mlp/last.pt'}: not a checkpoint of mlp",
        tmp_path / "nowhere": "no such run folder",
    }
    for run, message in cases.items():
        assert predict.main([str(images / "seven.png"), "--run", str(run)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err


# ------------------------------------------------------------ the endpoint


@pytest.fixture(scope="module")
def server(one_epoch_run):
    """The page's server on a free loopback port, with every model of the one-epoch run."""
    httpd = predict.make_server(predict.load_models(one_epoch_run), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def request(url, body=None, method=None):
    """(status, decoded JSON or text) of one request; error statuses are answers too."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method=method), timeout=30
        ) as response:
            status, data, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, data, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(data) if kind == "application/json" else data.decode()


def test_the_endpoint_answers_images_and_refuses_the_rest_in_one_line(server, test_digits):
    seven = png_bytes(test_digits[0][0])
    bad = {
        "too large": (b"\0" * (predict.MAX_BODY + 1), 413, "more than"),
        "not an image": (b"hello", 400, "not an image"),
        "blank": (png_bytes(np.full((50, 50), 255)), 422, "no ink found"),
    }
    for body, status, reason in bad.values():
        got, answer = request(f"{server}/predict", body)
        assert got == status and reason in answer["error"] and "\n" not in answer["error"]
        assert request(f"{server}/predict", seven)[0] == 200  # still serving
    assert (
        request(f"{server}/elsewhere")[0] == 404
        and request(f"{server}/predict", method="GET")[0] == 404
    )
    status, answer = request(f"{server}/predict", seven)
    assert status == 200 and set(answer["models"]) == {"lenet5", "mlp", "lenet5_reg"}
    assert (
        answer["models"]["lenet5"]["digit"] == 7 and len(answer["models"]["lenet5"]["probs"]) == 10
    )
    assert np.array(answer["view"]).shape == (28, 28)
    status, page = request(server)
    assert status == 200 and "<canvas" in page


def hooked(model, modules, image):
    """The outputs of ``modules`` of ``model`` on ``image``, after ReLU, taken here with forward
    hooks of our own."""
    out = {}
    handles = [
        model.get_submodule(m).register_forward_hook(
            lambda mod, i, o, m=m: out.__setitem__(m, o.relu()[0])
        )
        for m in modules
    ]
    with torch.inference_mode():
        model(image)
    for handle in handles:
        handle.remove()
    return out


def to_page(values):
    """The page's scaling, written out again: times 255 over the largest magnitude, rounded."""
    values = np.asarray(values, dtype=np.float64)
    return np.round(values * 255 / np.abs(values).max())


def test_each_answer_holds_what_each_model_computed_and_weights_the_mlps_first_layer(
    server, one_epoch_run, test_digits
):
    models = predict.load_models(one_epoch_run)
    status, answer = request(f"{server}/predict", png_bytes(test_digits[0][0]))
    assert status == 200 and set(answer["inside"]) == {"lenet5", "mlp", "lenet5_reg"}
    image = dataset.normalize(
        dataset.to_unit(torch.tensor(answer["view"], dtype=torch.uint8)[None])
    )
    layers = {  # the page's layer: the module whose output it is (after ReLU), and the shape
        "lenet5": {"conv1": ("conv1", (6, 28, 28)), "conv2": ("conv2", (16, 10, 10))},
        "lenet5_reg": {"conv1": ("bn1", (6, 28, 28)), "conv2": ("bn2", (16, 10, 10))},
        "mlp": {"fc1": ("fc1", (75,))},
    }
    for name, expected in layers.items():
        outputs = hooked(models[name][0], [module for module, _ in expected.values()], image)
        assert set(answer["inside"][name]) == set(expected)
        for layer, (module, shape) in expected.items():
            got = np.array(answer["inside"][name][layer])
            assert got.shape == shape and got.min() >= 0 and got.max() == 255
            assert np.abs(got - to_page(outputs[module])).max() <= 1  # rounding of float sums apart
    status, weights = request(f"{server}/weights")
    fc1 = models["mlp"][0].fc1.weight.detach().view(75, 28, 28)
    assert status == 200 and np.array(weights["fc1"]).shape == (75, 28, 28)
    assert (
        np.abs(np.array(weights["fc1"]) - to_page(fc1)).max() <= 1
        and np.array(weights["fc1"]).min() < 0
    )
    lone = predict.make_server({"lenet5": models["lenet5"]}, "127.0.0.1", 0)  # a run without an MLP
    thread = threading.Thread(target=lone.serve_forever, daemon=True)
    thread.start()
    try:
        status, answer = request(f"http://127.0.0.1:{lone.server_port}/weights")
        assert (
            status == 404 and answer["error"] == "the run has no trained mlp, so no weights to show"
        )
    finally:
        lone.shutdown()
        lone.server_close()


def test_a_closed_server_leaves_no_thread_of_its_own_running(one_epoch_run):
    # one still running when the interpreter exits can abort it: "bench.py --page" ended with
    # "terminate called without an active exception" in three runs of five while one did
    before = set(threading.enumerate())
    httpd = predict.make_server(predict.load_models(one_epoch_run), "127.0.0.1", 0)
    assert httpd.watcher.is_alive()
    httpd.server_close()
    assert not httpd.watcher.is_alive() and set(threading.enumerate()) <= before


# ------------------------------------------------------------ the page, in a real browser


def chromium():
    """Debian's Chromium (apt-get install chromium); .ci/run installs it, so CI never goes
    without."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the browser test: apt-get install chromium")
        pytest.skip("no Chromium on this machine: apt-get install chromium")
    return path


SEVEN = [[(60, 60), (220, 60), (120, 240)]]  # the top bar and the stem, in pad pixels (280x280)
ZERO = [[(140 + 60 * np.sin(t), 140 - 95 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 40)]]
LETTER_A = [[(70, 240), (140, 40), (210, 240)], [(100, 160), (180, 160)]]
# {model: [the red channel of each map or unit canvas it drew, as a list]}
DRAWN = """() => Object.fromEntries(["lenet5", "lenet5_reg", "mlp"].map(name => [name,
    [...document.querySelectorAll(`#${name} canvas`)].map(c =>
        Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data
            .filter((_, i) => i % 4 === 0)))]))"""


def draw(page, strokes):
    """Clear the pad and draw ``strokes`` on it with the mouse."""
    box = page.locator("#pad").bounding_box()
    page.click("#clear")
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        page.mouse.up()


def says(model, text):
    return f"document.querySelector('#{model} .digit')?.textContent === '{text}'"


def test_drawing_on_the_page_shows_each_models_digit_and_refuses_a_letter(server, tmp_path):
    from playwright.sync_api import sync_playwright

    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=flags)
        page = browser.new_page(viewport={"width": 900, "height": 620})
        page.goto(server)
        seen, computed = {}, {}
        for strokes, digit in [(SEVEN, 7), (ZERO, 0)]:
            draw(page, strokes)
            page.wait_for_function(says("lenet5_reg", digit), timeout=20_000)
            page.wait_for_function(says("lenet5", digit), timeout=20_000)
            assert (
                page.locator(".model").count() == 3 and page.locator("#lenet5 .bar").count() == 10
            )
            page.wait_for_function(
                "document.querySelectorAll('#mlp canvas.unit').length === 5", timeout=20_000
            )
            page.wait_for_function("() => !pending && !again", timeout=20_000)  # the last answer
            seen[digit] = page.evaluate(DRAWN)
            pad = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
            _, answer = request(f"{server}/predict", base64.b64decode(pad.split(",", 1)[1]))
            computed[digit] = answer["inside"]
        draw(page, LETTER_A)
        page.wait_for_function(says("lenet5_reg", "not a digit"), timeout=20_000)
        # still shown, greyed: its probabilities and its maps
        assert page.locator("#lenet5_reg.refused .bar").count() == 10
        assert page.locator("#lenet5_reg.refused canvas.map").count() == 22
        assert page.locator("#lenet5_reg .confidence").text_content().startswith("closest: ")
        screenshot = Path(os.environ.get("PREDICT_SCREENSHOT", tmp_path / "page.png"))
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    # LeNet-5's 6 + 16 maps, the same for lenet5_reg, the MLP's 5 units
    for digit, drawn in seen.items():
        assert [len(drawn[k]) for k in ("lenet5", "lenet5_reg", "mlp")] == [22, 22, 5]
        for name in ("lenet5", "lenet5_reg"):  # each map drawn as the server computed it
            maps = [m for layer in ("conv1", "conv2") for m in computed[digit][name][layer]]
            assert [np.ravel(m).tolist() for m in maps] == drawn[name], (name, digit)
        assert all(any(pixels) for pixels in drawn["mlp"]), f"a blank unit for the {digit}"
    for name in ("lenet5", "lenet5_reg"):  # what the models saw differs between a 7 and a 0
        assert sum(a != b for a, b in zip(seen[7][name], seen[0][name], strict=False)) >= 20
    with Image.open(screenshot) as shot:
        assert shot.width == 900 and shot.height >= 620


def test_bad_port_and_view_are_one_line_and_views_of_same_named_images_are_kept_apart(
    one_epoch_run, images, tmp_path, capsys
):
    (tmp_path / "a_file").write_text("")
    for argv, message in [
        (
            ["--serve", "--port", "70000"],
            "argument --port: expected a port number from 0 to 65535, got '70000'",
        ),
        (
            ["--serve", "--port", "http"],
            "argument --port: expected a port number from 0 to 65535, got 'http'",
        ),
        (
            [str(images / "seven.png"), "--view", str(tmp_path / "a_file")],
            f"{tmp_path / 'a_file'}: a file, not a folder",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            predict.main([*argv, "--run", str(one_epoch_run)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err
        assert err.splitlines()[-1].startswith("predict.py: error:")
    (images / "other").mkdir()
    # another image of the same name: a 2
    shutil.copy(images / "photo.jpg", images / "other/seven.jpg")
    files = [images / "seven.png", images / "other/seven.jpg"]
    views = tmp_path / "views"
    assert (
        predict.main(
            [*map(str, files), "--run", str(one_epoch_run), "--json", "--view", str(views)]
        )
        == 0
    )
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["view"] for a in answers] == [str(views / "seven.png"), str(views / "seven-2.png")]
    for answer, path in zip(answers, files, strict=False):
        with Image.open(answer["view"]) as view:
            assert np.array_equal(
                np.asarray(view), preprocess.to_mnist(preprocess.open_image(path.read_bytes()))[1]
            )


# ------------------------------------------------------------ the server on a network


@pytest.fixture
def strict_server(one_epoch_run):
    """The page's server with short limits: idle 1 s, a request read in 3 s, a decoder awaited 0.3
    s."""
    httpd = predict.make_server(
        predict.load_models(one_epoch_run, ["lenet5"]),
        "127.0.0.1",
        0,
        idle=1,
        deadline=3,
        decode_wait=0.3,
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def raw(server, data, wait=5):
    """What the server sends back on one connection for ``data`` sent raw, until it closes it (or
    ``wait`` s)."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := connection.recv(65536):
                received += chunk
    return received


def test_a_content_length_that_is_not_a_whole_number_is_refused_at_once_unread(
    strict_server, capsys
):
    for length in ["-1", "-300000000", "abc", "1e3", "+5", " 12 3"]:
        start = time.monotonic()
        answer = raw(
            strict_server,
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.0 400") and b"is not a whole number of bytes" in answer, (
            length
        )
        assert time.monotonic() - start < 1  # answered at once, not after the client gave up
    answer = raw(strict_server, b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 411")
    err = capsys.readouterr().err
    assert err.count("\n") == 7 and "Traceback" not in err


def test_idle_and_slow_connections_are_closed_after_a_few_seconds_without_a_traceback(
    strict_server, capsys
):
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", strict_server.server_port)) for _ in range(30)]
    start = time.monotonic()
    while threading.active_count() < before + 30 and time.monotonic() - start < 0.9:
        time.sleep(0.01)
    assert threading.active_count() >= before + 30  # a thread each, while they are open
    for connection in idle:
        connection.settimeout(3)
        assert connection.recv(1) == b""  # closed by the server
        connection.close()
    # at the idle timeout (1 s), before the deadline (3 s) came
    assert time.monotonic() - start < 2.5
    slow = socket.create_connection(("127.0.0.1", strict_server.server_port), timeout=5)
    start = time.monotonic()
    # a byte every 0.2 s: each read is quick, the request never ends
    with contextlib.suppress(ConnectionError):
        for byte in b"POST /predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            slow.send(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - start > 6:
                break
    assert time.monotonic() - start < 5  # cut off at the deadline (3 s), the send then fails
    slow.close()
    time.sleep(0.3)
    assert threading.active_count() <= before + 1
    assert "Traceback" not in capsys.readouterr().err


def big_jpeg(size=(8000, 6000)):
    image = Image.new("L", size, 255)
    ImageDraw.Draw(image).line([(2000, 1500), (5000, 1500), (3000, 4500)], fill=0, width=400)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_reduced_and_other_large_images_are_refused():
    photo = preprocess.open_image(big_jpeg())  # 48 megapixels
    assert photo.size == (1000, 750)  # decoded at an eighth of its size, still above WORK_SIDE
    assert preprocess.to_mnist(photo)[1].max() == 255
    with pytest.raises(ImageInputError, match="7000x7000 pixels is more than 16,000,000 for a PNG"):
        preprocess.open_image(png_bytes(np.full((7000, 7000), 255, np.uint8)))
    with pytest.raises(ImageInputError, match="10000x6000 pixels is more than 50,000,000"):
        preprocess.open_image(big_jpeg((10_000, 6000)))


def test_images_wait_for_a_free_decoder_and_get_503_when_none_frees(
    strict_server, test_digits, capsys
):
    url = f"http://127.0.0.1:{strict_server.server_port}/predict"
    seven = png_bytes(test_digits[0][0])
    for _ in range(predict.DECODERS):  # every decoder busy
        strict_server.decoding.acquire()
    status, answer = request(url, seven)
    assert status == 503 and answer["error"] == "busy: other images are being decoded; try again"
    threading.Timer(0.1, strict_server.decoding.release).start()  # one frees within the wait
    assert request(url, seven)[0] == 200
    for _ in range(predict.DECODERS - 1):
        strict_server.decoding.release()
    assert capsys.readouterr().err.count("\n") == 1


def test_a_paths_control_characters_are_escaped_in_the_log_and_a_client_leaving_costs_no_traceback(
    server, strict_server, capsys
):
    raw(strict_server, b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
    err = capsys.readouterr().err
    assert "GET /\\x1b[31mred\\x07: 404" in err and "\x1b" not in err and "\x07" not in err
    # asks for the weights (250 KB), and resets the connection before reading them
    for _ in range(5):
        connection = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.sendall(b"GET /weights HTTP/1.1\r\nHost: x\r\n\r\n")
        connection.close()  # before the server, busy making them, writes a byte
    time.sleep(0.5)
    assert request(f"{server}/weights")[0] == 200  # still serving
    assert "Traceback" not in capsys.readouterr().err
