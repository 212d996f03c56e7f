"""Dataset readers on small files written in the real formats, their error messages, and batching."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from certkit.data import ArrayDataset, dataset_info, load_dataset, random_crop_flip, read_idx
from certkit.errors import CertkitError
from helpers import make_cifar_dataset, make_idx_dataset, write_idx


def test_idx_round_trip(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "mnist", n_train=12, n_test=5)
    train = load_dataset("mnist", "train", data_dir=root)
    test = load_dataset("mnist", "test", data_dir=root)
    assert len(train) == 12 and len(test) == 5
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8)[0], torch.from_numpy(raw[3].copy()))
    assert 0 <= y < 10


def test_idx_uncompressed_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 4), ("t10k", 3)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz=False)
    monkeypatch.setenv("CERTKIT_DATA", str(root))
    assert len(load_dataset("mnist", "test")) == 3


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.write_bytes(b"not gzip at all"), "not a readable gzip"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 12)), "bad IDX magic"),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), "data bytes, expected"),
    ],
    ids=["missing", "not-gzip", "bad-magic", "truncated"],
)
def test_idx_errors_name_the_file(tmp_path: Path, corrupt, expected: str) -> None:
    root = make_idx_dataset(tmp_path / "m")
    target = root / "train-images-idx3-ubyte.gz"
    corrupt(target)
    with pytest.raises(CertkitError) as e:
        load_dataset("mnist", "train", data_dir=root)
    assert expected in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    assert "\n" not in str(e.value)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "m", n_train=6)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(CertkitError, match="5 labels for 6 images"):
        load_dataset("mnist", "train", data_dir=root)


def test_idx_labels_outside_the_classes_name_the_file(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "m", n_train=6)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 200, 4, 5]))
    with pytest.raises(CertkitError, match=r"train-labels-idx1-ubyte\.gz: labels outside 0\.\.9 \(found 200\)"):
        load_dataset("mnist", "train", data_dir=root)


def test_a_split_of_zero_images_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "m", n_test=0)
    with pytest.raises(CertkitError, match=r"t10k-images-idx3-ubyte\.gz: declares 0 images"):
        load_dataset("mnist", "test", data_dir=root)
    cifar = make_cifar_dataset(tmp_path / "c", per_batch=2) / "cifar-10-batches-py"
    empty = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    (cifar / "test_batch").write_bytes(pickle.dumps(empty, protocol=4))  # protocol 2 cannot pickle an empty array
    with pytest.raises(CertkitError, match="test_batch: holds 0 images"):
        load_dataset("cifar10", "test", data_dir=cifar)


def test_mnist_needs_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTKIT_DATA", raising=False)
    with pytest.raises(CertkitError, match="--data-dir"):
        load_dataset("mnist", "train")


def test_unknown_dataset_lists_valid() -> None:
    with pytest.raises(CertkitError, match="fashion-mnist, mnist, cifar10, imagenet"):
        dataset_info("svhn")


def test_cifar10_reader(tmp_path: Path) -> None:
    root = make_cifar_dataset(tmp_path / "c", per_batch=4)
    train = load_dataset("cifar10", "train", data_dir=root)
    test = load_dataset("cifar10", "test", data_dir=root / "cifar-10-batches-py")
    assert len(train) == 20 and len(test) == 4
    assert train.augment and not test.augment
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the test's own file
    x, y = test[2]
    assert y == batch[b"labels"][2]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(batch[b"data"][2].reshape(3, 32, 32)))
    xb, _ = next(train.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert xb.shape == (8, 3, 32, 32) and xb.min() >= 0 and xb.max() <= 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/certkit-pwned-cifar",))


def test_cifar_pickle_payload_is_refused(tmp_path: Path) -> None:
    root = make_cifar_dataset(tmp_path / "c", per_batch=2)
    marker = Path("/tmp/certkit-pwned-cifar")
    marker.unlink(missing_ok=True)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": [0]}, f)
    with pytest.raises(CertkitError, match="test_batch: not a CIFAR-10 batch"):
        load_dataset("cifar10", "test", data_dir=root)
    assert not marker.exists()


def test_cifar_missing_batch(tmp_path: Path) -> None:
    root = make_cifar_dataset(tmp_path / "c", per_batch=2)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CertkitError, match="data_batch_3: missing"):
        load_dataset("cifar10", "train", data_dir=root)


def _image_folders(root: Path, per_class: int = 2) -> Path:
    """ImageNet-style ``train/`` and ``val/`` folders of three classes of small random PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_imagenet_folder(tmp_path: Path) -> None:
    ds = load_dataset("imagenet", "test", data_dir=_image_folders(tmp_path))
    ds.workers = 0
    assert len(ds) == 6 and ds.classes == ["n01", "n02", "n03"]
    x, y = ds[5]
    assert x.shape == (3, 224, 224) and y == 2 and float(x.min()) >= 0 and float(x.max()) <= 1
    xb, yb = next(ds.batches(4))
    assert xb.shape == (4, 3, 224, 224) and yb.tolist() == [0, 0, 1, 1]
    with pytest.raises(CertkitError, match="missing"):
        load_dataset("imagenet", "train", data_dir=tmp_path / "nowhere")


def test_imagenet_items_are_never_augmented(tmp_path: Path) -> None:
    """What certification reads (``dataset[i]``, also of the train split) is the same image every time; only
    the training batches of an ``augment`` dataset (the train split's default) are random crops and flips."""
    root = _image_folders(tmp_path, per_class=1)
    train = load_dataset("imagenet", "train", data_dir=root)
    assert train.augment and not load_dataset("imagenet", "test", data_dir=root).augment
    assert torch.equal(train[0][0], train[0][0])
    plain = load_dataset("imagenet", "train", data_dir=root, augment=False).subset(2)
    plain.workers = train.workers = 0
    assert len(plain) == 2 and torch.equal(next(plain.batches(2))[0], next(plain.batches(2))[0])
    assert torch.equal(next(plain.batches(1))[0][0], train[0][0])
    torch.manual_seed(0)
    assert not torch.equal(next(train.batches(3))[0], next(train.batches(3))[0])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_named_also_from_a_worker(tmp_path: Path, workers: int) -> None:
    root = _image_folders(tmp_path)
    bad = root / "val" / "n02" / "1.png"
    bad.write_bytes(b"not an image")
    ds = load_dataset("imagenet", "test", data_dir=root)
    ds.workers = workers
    with pytest.raises(CertkitError) as e:
        list(ds.batches(2))
    assert str(e.value).startswith(f"{bad}: not a readable image") and "\n" not in str(e.value)
    with pytest.raises(CertkitError, match="not a readable image"):
        ds[3]


def test_random_crop_flip_is_a_shifted_crop() -> None:
    """Each output image is the 8x8 window at some offset (oy, ox) of the zero-padded image, mirrored left to
    right or not; over 64 images (fixed generator) both choices of the flip and many offsets occur."""
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = []
    for i in range(64):
        matches = [
            (flip, oy, ox)
            for flip in (False, True)
            for oy in range(5)
            for ox in range(5)
            if torch.equal(
                padded[i, :, oy : oy + 8, ox : ox + 8].flip(2) if flip else padded[i, :, oy : oy + 8, ox : ox + 8],
                out[i],
            )
        ]
        # random pixels: a window and its mirror image are never equal to another window
        assert len(matches) == 1, f"image {i} is not one shifted (and maybe flipped) crop: {matches}"
        seen.append(matches[0])
    assert {flip for flip, _, _ in seen} == {False, True}
    assert len({(oy, ox) for _, oy, ox in seen}) >= 10
    assert len({oy for _, oy, _ in seen}) >= 3 and len({ox for _, _, ox in seen}) >= 3


def test_batches_cover_each_image_once_and_shard_disjointly() -> None:
    info = dataset_info("mnist")
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()
    ds = ArrayDataset(info, images, torch.arange(10) % 10)
    seen = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    parts = [
        torch.cat(
            [
                y
                for _, y in ds.batches(
                    2, shuffle=True, generator=torch.Generator().manual_seed(5), rank=r, world_size=2
                )
            ]
        )
        for r in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 5 and not set(parts[0].tolist()) & set(parts[1].tolist())


def test_real_fashion_mnist(fmnist_root: Path) -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [1000] * 10
