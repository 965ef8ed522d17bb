"""preprocess.py: a photo is turned upright as the camera saw it, and specks are not ink."""

import io

import numpy as np
from PIL import Image, ImageDraw

import preprocess


def an_l(side=120):
    """A dark L on white paper: its long stroke upright on the left, its foot to the right."""
    page = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(page)
    draw.line([(30, 15), (30, 100)], fill=0, width=12)
    draw.line([(30, 100), (90, 100)], fill=0, width=12)
    return page


def test_a_photo_is_turned_upright_as_its_exif_orientation_says():
    upright = an_l()
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored pixels turned 90 degrees clockwise
    stored = io.BytesIO()
    upright.rotate(90).save(stored, format="JPEG", quality=95, exif=exif)  # stored turned back
    image = preprocess.open_image(stored.getvalue())
    ink = np.asarray(image) < 128
    assert np.mean(ink == (np.asarray(upright) < 128)) > 0.99


def test_specks_are_not_ink_and_the_box_is_the_digits():
    ink = np.zeros((40, 40))
    ink[10:30, 18:22] = 1  # a stroke
    ink[2, 2] = ink[37, 38] = 1  # two lone specks
    assert preprocess.ink_box(ink) == (10, 30, 18, 22)
