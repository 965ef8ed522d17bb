import functools
import gzip
import http.server
import tarfile
import threading

import numpy as np
import pytest
import torch
from conftest import (
    SHARED_MNIST,
    bomb_png,
    digit,
    make_read_only,
    make_tar,
    png_bytes,
    tiny_idx_dir,
    write_idx,
)
from torch.utils.data import BatchSampler, RandomSampler

import dataset
from dataset import MEAN, MNIST, STD, BatchSlices, DatasetError


def normalized(value):
    return (value / 255 - MEAN) / STD


def folder_entry(name):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@pytest.fixture
def good_tar(tmp_path):
    # Members out of ID order, with the clutter an archiver leaves, and a folder entry.
    return make_tar(
        tmp_path / "train.tar",
        [
            (folder_entry("train"), None),
            ("train/00002_7.png", png_bytes(digit(255))),
            ("train/00000_5.png", png_bytes(digit(0))),
            ("train/.DS_Store", b"junk"),
            ("train/._00001_0.png", b"resource fork"),
            ("__MACOSX/train/._00000_5.png", b"resource fork"),
            ("train/00001_0.png", png_bytes(digit(128))),
        ],
    )


def test_items_are_ordered_by_id_labelled_from_names_and_normalized(good_tar):
    data = MNIST(good_tar)
    assert len(data) == 3
    assert [data[i][1] for i in range(3)] == [5, 0, 7]
    image, label = data[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and type(label) is int
    for i, value in enumerate([0, 128, 255]):
        assert torch.allclose(data[i][0], torch.full((1, 28, 28), normalized(value)), atol=1e-6)


def test_a_list_of_indices_gives_the_same_items_as_a_batch(good_tar):
    data = MNIST(good_tar)
    images, labels = data[[2, 0]]
    assert images.shape == (2, 1, 28, 28)
    assert torch.equal(images[0], data[2][0]) and labels.tolist() == [7, 5]


def test_batch_order_is_the_random_samplers_drawn_on_the_cpu_and_moved_to_the_device():
    slices = list(BatchSlices(10, 4, torch.Generator().manual_seed(0)))
    sampler = BatchSampler(
        RandomSampler(range(10), generator=torch.Generator().manual_seed(0)), 4, drop_last=False
    )
    assert [batch.tolist() for batch in slices] == list(sampler)
    moved = list(BatchSlices(10, 4, torch.Generator().manual_seed(0), torch.device("meta")))
    # any device but the CPU shows the move
    assert [batch.device.type for batch in moved] == ["meta"] * 3


def test_a_directory_of_pngs_reads_like_the_tar(good_tar, tmp_path):
    folder = tmp_path / "extracted"
    with tarfile.open(good_tar) as tar:
        tar.extractall(folder, filter="data")
    from_dir, from_tar = MNIST(folder), MNIST(good_tar)
    assert torch.equal(from_dir.images, from_tar.images) and torch.equal(
        from_dir.labels, from_tar.labels
    )


def test_grey_rgb_and_rgba_pngs_are_read_as_grayscale(tmp_path):
    grey = digit(200)
    rgb = np.stack([grey] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    tar = make_tar(
        tmp_path / "t.tar",
        [("0_1.png", png_bytes(rgb, "RGB")), ("1_2.png", png_bytes(rgba, "RGBA"))],
    )
    data = MNIST(tar)
    assert (data.images == 200).all()


def test_decoded_split_is_cached_beside_the_tar_and_a_changed_tar_is_decoded_afresh(good_tar):
    first = MNIST(good_tar)
    caches = list((good_tar.parent / ".cache").glob("train.tar.*.pt"))
    assert len(caches) == 1
    cached = torch.load(caches[0], weights_only=True)
    assert cached["images"].dtype == torch.uint8 and torch.equal(cached["images"], first.images)

    make_tar(good_tar, [("train/00000_3.png", png_bytes(digit(9)))])
    changed = MNIST(good_tar)
    assert changed.labels.tolist() == [3] and (changed.images == 9).all()
    # the stale cache is gone
    assert len(list((good_tar.parent / ".cache").glob("train.tar.*.pt"))) == 1


def test_limit_keeps_the_first_items(good_tar):
    assert MNIST(good_tar, limit=2).labels.tolist() == [5, 0]


def test_augmentation_distorts_images_but_keeps_labels_and_shapes(good_tar, tmp_path):
    stroke = digit(0)
    stroke[4:24, 12:16] = 255
    tar = make_tar(tmp_path / "s.tar", [(f"{i}_1.png", png_bytes(stroke)) for i in range(16)])
    plain = MNIST(tar)
    torch.manual_seed(0)
    augmented = plain.distorted()
    images, labels = augmented[list(range(16))]
    assert images.shape == (16, 1, 28, 28) and torch.equal(labels, plain.labels)
    assert augmented.augmented and not plain.augmented and augmented.images is plain.images
    originals = plain[list(range(16))][0]
    changed = [
        tuple(im.flatten().tolist())
        for im, p in zip(images, originals, strict=False)
        if not torch.equal(im, p)
    ]
    # a different distortion per image
    assert len(changed) >= 8 and len(set(changed)) == len(changed)
    torch.manual_seed(0)
    # reproducible from the torch seed
    assert torch.equal(plain.distorted()[list(range(16))][0], images)
    assert not torch.equal(plain.distorted()[list(range(16))][0], images)  # and new at every call


def bad_cases(tmp_path):
    good = png_bytes(digit(0))
    truncated = make_tar(
        tmp_path / "whole.tar", [(f"{i:05d}_1.png", good) for i in range(20)]
    ).read_bytes()
    (tmp_path / "truncated.tar").write_bytes(truncated[: len(truncated) // 2 + 100])
    (tmp_path / "text.tar").write_text("this is not a tar archive\n" * 40)
    return {
        "missing": (tmp_path / "nope.tar", "no such file"),
        "not a tar": (tmp_path / "text.tar", "not a tar archive"),
        "truncated": (tmp_path / "truncated.tar", "truncated"),
        "empty": (make_tar(tmp_path / "empty.tar", []), "no PNG images"),
        "no pngs": (make_tar(tmp_path / "txt.tar", [("README.txt", b"hi")]), "no PNG images"),
        "undecodable": (
            make_tar(tmp_path / "u.tar", [("00000_1.png", b"\x89PNG garbage")]),
            "not a decodable PNG",
        ),
        "no label": (make_tar(tmp_path / "n.tar", [("digit.png", good)]), "not {ID}_{Label}.png"),
        "label 12": (
            make_tar(tmp_path / "l.tar", [("00000_12.png", good)]),
            "label 12 is outside 0-9",
        ),
        "label 10": (
            make_tar(tmp_path / "m.tar", [("00000_10.png", good)]),
            "label 10 is outside 0-9",
        ),
        "duplicate id": (
            make_tar(tmp_path / "d.tar", [("a/00007_1.png", good), ("b/00007_2.png", good)]),
            "ID 7 already used by a/00007_1.png",
        ),
        "27x28": (
            make_tar(tmp_path / "s.tar", [("00000_1.png", png_bytes(np.zeros((27, 28))))]),
            "expected 28x28",
        ),
        "bomb": (make_tar(tmp_path / "b.tar", [("00000_1.png", bomb_png())]), "pixel"),
        "colour": (
            make_tar(
                tmp_path / "c.tar",
                [("00000_1.png", png_bytes(np.random.randint(0, 255, (28, 28, 3)), "RGB"))],
            ),
            "colour image",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not a tar",
        "truncated",
        "empty",
        "no pngs",
        "undecodable",
        "no label",
        "label 12",
        "label 10",
        "duplicate id",
        "27x28",
        "bomb",
        "colour",
    ],
)
def test_bad_input_raises_one_line_naming_the_file_and_member(tmp_path, case):
    path, expected = bad_cases(tmp_path)[case]
    with pytest.raises(DatasetError) as error:
        MNIST(path)
    message = str(error.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_hostile_member_names_and_links_write_nothing_outside(tmp_path, capsys):
    target = tmp_path / "data"
    target.mkdir()
    link = tarfile.TarInfo("00002_3.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    device = tarfile.TarInfo("00003_3.png")
    device.type = tarfile.CHRTYPE
    tar = make_tar(
        target / "evil.tar",
        [
            ("/tmp/00000_1.png", png_bytes(digit(1))),
            ("../../00001_2.png", png_bytes(digit(2))),
            (link, None),
            (device, None),
        ],
    )
    before = set(tmp_path.parent.iterdir())
    data = MNIST(tar)
    assert data.labels.tolist() == [1, 2]  # links and devices are skipped
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith(
        f"warning: {tar}: skipped 2 link or device member(s);"
    )
    assert "read 2 member(s) with an absolute or '..' path in memory" in warning
    assert set(tmp_path.parent.iterdir()) == before
    assert {p.name for p in target.rglob("*")} == {
        "evil.tar",
        ".cache",
        next((target / ".cache").iterdir()).name,
    }


# ------------------------------------------------------------ prepare


def test_prepare_writes_the_course_layout_from_idx_files(tmp_path):
    idx, arrays = tiny_idx_dir(tmp_path / "idx")
    train_tar, test_tar = dataset.prepare(tmp_path / "data", idx)
    with tarfile.open(train_tar) as tar:
        names = tar.getnames()
    labels = arrays["train-labels-idx1-ubyte.gz"]
    assert names == [f"train/{i:05d}_{label}.png" for i, label in enumerate(labels)]
    train = MNIST(train_tar)
    assert torch.equal(
        train.images, torch.tensor(arrays["train-images-idx3-ubyte.gz"], dtype=torch.uint8)
    )
    assert train.labels.tolist() == labels.tolist()
    assert MNIST(test_tar).labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_an_interrupted_prepare_leaves_no_tar(tmp_path, monkeypatch):
    idx, _ = tiny_idx_dir(tmp_path / "idx")
    calls = 0

    def add_then_stop(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 10:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(tmp_path / "data", idx)
    assert not (tmp_path / "data").exists()  # no tar, and no folder made for nothing


def test_idx_files_that_do_not_fit_are_reported(tmp_path):
    idx, _ = tiny_idx_dir(tmp_path / "idx")
    write_idx(idx / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(DatasetError, match="do not fit 5 labels"):
        dataset.prepare(tmp_path / "data", idx)
    (idx / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03junk")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: not an IDX file"):
        dataset.prepare(tmp_path / "data", idx, splits=["test"])


def test_prepare_cli_without_idx_files_exits_1_naming_the_folder(tmp_path, capsys):
    assert (
        dataset.main(["prepare", "--idx-dir", str(tmp_path / "none"), "--out", str(tmp_path / "d")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none: no such directory" in err


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    """An HTTP mirror on the loopback address serving the shared IDX files."""
    handler = functools.partial(QuietHandler, directory=SHARED_MNIST)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}/"
        server.shutdown()


def test_download_insists_on_official_checksums_and_deletes_a_mismatch(tmp_path, capsys, mirror):
    # The shared copy is official but for the rebuilt training images.
    with pytest.raises(DatasetError) as error:
        dataset.download_idx(tmp_path / "raw", mirrors=[mirror])
    assert "train-images-idx3-ubyte.gz (wrong MD5)" in str(error.value)
    assert "MD5 is not the official" in capsys.readouterr().err
    assert not (tmp_path / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_download_takes_each_file_from_the_first_mirror_that_has_it(tmp_path, monkeypatch, mirror):
    # Only the test split, whose files are official: the first mirror refuses, the second serves.
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    monkeypatch.setattr(dataset, "IDX_FILES", {n: dataset.IDX_FILES[n] for n in names})
    dataset.download_idx(tmp_path / "raw", mirrors=["http://127.0.0.1:9/", mirror])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == names
    assert dataset.calculate_md5(tmp_path / "raw" / names[0]) == dataset.IDX_FILES[names[0]]


def test_no_network_says_what_was_tried_and_the_three_ways_out(tmp_path, capsys):
    # the discard port: connection refused, never leaves the machine
    unreachable = ["http://127.0.0.1:9/mnist/"]
    with pytest.raises(DatasetError) as error:
        dataset.prepare(tmp_path / "data", mirrors=unreachable)
    message = str(error.value)
    assert "http://127.0.0.1:9/mnist/train-images-idx3-ubyte.gz" in message
    assert f"put train.tar and test.tar in {tmp_path / 'data'}," in message
    assert "--idx-dir" in message and "connect" in message


def test_trusted_idx_copy_with_another_checksum_is_only_a_warning(tmp_path, capsys):
    dataset._check_trusted(SHARED_MNIST / "train-images-idx3-ubyte.gz")
    dataset._check_trusted(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "train-images-idx3-ubyte.gz: MD5 differs" in err


# ------------------------------------------------------------ the real data


def test_real_mnist_tars_have_the_official_sizes_labels_and_statistics(mnist_dir):
    train, test = MNIST(mnist_dir / "train.tar"), MNIST(mnist_dir / "test.tar")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train[0][1] == 5 and test[0][1] == 7
    for split, labels_file in [
        (train, "train-labels-idx1-ubyte.gz"),
        (test, "t10k-labels-idx1-ubyte.gz"),
    ]:
        with gzip.open(SHARED_MNIST / labels_file) as f:
            official = np.frombuffer(f.read(), np.uint8, offset=8)
        assert (
            torch.bincount(split.labels, minlength=10).tolist()
            == np.bincount(official, minlength=10).tolist()
        )
    # MEAN and STD are the training images' own, to their four digits
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - MEAN) < 5e-4 and abs(pixels.std().item() - STD) < 5e-4
    images, _ = train[list(range(len(train)))]
    assert (
        abs(images.double().mean().item()) < 1e-3 and abs(images.double().std().item() - 1) < 1e-3
    )


def test_any_integer_index_gives_one_item_as_subset_and_dataloader_hand_them_over(good_tar):
    data = MNIST(good_tar)
    for index in (1, np.int64(1), np.int32(1), torch.tensor(1)):
        image, label = data[index]
        assert image.shape == (1, 28, 28) and label == 0 and isinstance(label, int)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, np.arange(3)), batch_size=2)
    images, labels = next(iter(loader))
    assert images.shape == (2, 1, 28, 28) and labels.tolist() == [5, 0]


# ------------------------------------------------------------ read-only folders


def test_a_read_only_data_folder_with_an_old_cache_is_read_with_a_warning(
    good_tar, capsys, monkeypatch
):
    stale = good_tar.parent / ".cache" / "train.tar.0123abcd.v0.pt"  # a cache of an older version
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    make_read_only(monkeypatch, good_tar.parent)
    assert MNIST(good_tar).labels.tolist() == [5, 0, 7]
    err = capsys.readouterr().err
    reason = "(Read-only file system); working without it"
    assert err == f"warning: {stale.parent}: cannot write the cache there {reason}\n"
    assert stale.read_bytes() == b"old"


@pytest.mark.parametrize("with_idx", [False, True])
def test_a_read_only_data_folder_without_tars_says_so(tmp_path, capsys, monkeypatch, with_idx):
    idx, _ = tiny_idx_dir(tmp_path / "idx")
    data = tmp_path / "data"
    data.mkdir()
    make_read_only(monkeypatch, data)
    with pytest.raises(DatasetError) as error:
        dataset.prepare(data, idx if with_idx else None, mirrors=["http://127.0.0.1:9/"])
    assert str(error.value) == f"{data}: cannot write the tars there (Read-only file system)"
    monkeypatch.undo()
    assert list(data.iterdir()) == []


def test_a_failed_download_leaves_no_folder_behind_and_blames_the_network_only_when_it_failed(
    tmp_path, mirror
):
    # the shared training images are a rebuild: wrong MD5
    with pytest.raises(DatasetError) as error:
        dataset.prepare(tmp_path / "new" / "data", mirrors=[mirror])
    # neither data/raw/ with the files that did download, nor data/
    assert list(tmp_path.iterdir()) == []
    assert "(wrong MD5)" in str(error.value) and "connect to the internet" not in str(error.value)
    with pytest.raises(DatasetError) as error:
        dataset.prepare(tmp_path / "data", mirrors=["http://127.0.0.1:9/", mirror])
    assert "connect to the internet" in str(error.value)
