"""Hostile data files (review 16): forged CIFAR-10 pickles that reach numpy's raw constructors, allocation
bombs inside the size limits, labels beyond int64, files that fail on read, and FIFOs, symlink loops or
directories where a data file or an image is expected.

Each case must end in one one-line :class:`CertkitError` naming the file; the bombs also within a memory
bound (tracemalloc, as in ``test_hostile_files``).
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import certkit.data
from certkit.data import CIFAR_BATCH_IMAGES, MAX_CIFAR_BATCH_BYTES, load_dataset
from certkit.errors import CertkitError
from certkit.smoothing.runner import dataset_identity
from helpers import make_cifar_dataset, make_idx_dataset
from test_hostile_files import MiB, refused

# ----------------------------------------------------------------------------------------------------------
# Pickle opcodes, to write what no pickler writes
# ----------------------------------------------------------------------------------------------------------
NDARRAY = b"cnumpy\nndarray\n"
RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\n"


def int4(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def text2(s: bytes) -> bytes:
    """A Python 2 ``str`` (SHORT_BINSTRING or BINSTRING), which ``encoding='bytes'`` reads as bytes."""
    return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<I", len(s)) + s


def dtype2(name: bytes, flags: int = 0) -> bytes:
    """``numpy.dtype(name, 0, 1)`` and its state, as Python 2's numpy wrote them; ``flags`` is the state's
    last field, which numpy copies into the dtype as it stands."""
    state = b"(" + b"K\x03" + text2(b"|") + b"NNN" + int4(-1) + int4(-1) + int4(flags) + b"t"
    return b"cnumpy\ndtype\n" + text2(name) + b"K\x00K\x01\x87R" + state + b"b"


def array2(shape: tuple[int, ...], dtype: bytes, raw: bytes, flags: int = 0) -> bytes:
    """A numpy array as Python 2's cPickle wrote CIFAR-10 (protocol 2): the reconstructor called with a
    placeholder, then BUILD with (version, shape, dtype, fortran, data)."""
    shape_ops = b"(" + b"".join(int4(d) for d in shape) + b"t"
    state = b"(" + b"K\x01" + shape_ops + dtype2(dtype, flags) + b"\x89" + text2(raw) + b"t"
    return RECONSTRUCT + NDARRAY + b"K\x00\x85" + text2(b"b") + b"\x87R" + state + b"b"


def batch2(data: bytes, labels: bytes) -> bytes:
    """``{'data': ..., 'labels': ...}`` from the ops of each value."""
    return b"\x80\x02}(" + text2(b"data") + data + text2(b"labels") + labels + b"u."


def int_list(values: list[int]) -> bytes:
    return b"](" + b"".join(int4(v) for v in values) + b"e"


def write_test_batch(tmp_path: Path, payload: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(payload)
    return folder / "test_batch"


def load_test(tmp_path: Path) -> Any:
    return load_dataset("cifar10", "test", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10: the formats that must still read
# ----------------------------------------------------------------------------------------------------------


def test_a_batch_in_python_2_format_reads(tmp_path: Path) -> None:
    """The CIFAR-10 files themselves were pickled by Python 2: names and data are byte strings."""
    images = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    write_test_batch(tmp_path, batch2(array2((3, 3072), b"u1", images.tobytes()), int_list([7, 0, 9])))
    ds = load_test(tmp_path)
    assert ds.labels.tolist() == [7, 0, 9]
    assert np.array_equal(ds.images.numpy().reshape(3, 3072), images)


def test_numpy_label_arrays_of_every_protocol_read(tmp_path: Path) -> None:
    images = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for protocol in (2, 4):
        labels = np.array([3, 4], dtype=np.int64)
        write_test_batch(tmp_path, pickle.dumps({b"data": images, b"labels": labels}, protocol=protocol))
        ds = load_test(tmp_path)
        assert ds.labels.tolist() == [3, 4] and np.array_equal(ds.images.numpy().reshape(2, 3072), images)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10: forged pickles
# ----------------------------------------------------------------------------------------------------------


def test_a_forged_object_pointer_is_refused(tmp_path: Path) -> None:
    """The review's 75-byte batch: ``ndarray(ndarray((1,), dtype('O'), b'AAAAAAAA'))``. numpy builds an object
    array whose element is the pointer 0x4141414141414141, and reading it crashed the interpreter (rc 139
    before this fix; a crash would end this test process, so that run is the review's evidence)."""
    forged = (
        NDARRAY + b"(" + int4(1) + b"\x85" + b"cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R" + b"C\x08" + b"A" * 8 + b"tR"
    )
    payload = b"\x80\x02" + NDARRAY + forged + b"\x85R."
    assert len(payload) == 75
    target = write_test_batch(tmp_path, payload)
    refused(lambda: load_test(tmp_path), str(target), "not a CIFAR-10 batch", "refusing to call numpy.ndarray")


def test_a_zero_stride_array_of_half_a_million_images_is_refused(tmp_path: Path) -> None:
    """``ndarray((500000, 3072), 'u1', buffer, 0, (0, 1))`` shares one 3 KB row among all images, and the
    labels one 8-byte label: a 3 KB file was read as a test set of 1.5 GB of images, before this fix."""
    n = 500_000
    u1 = b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x85R"
    row = b"B" + struct.pack("<I", 3072) + b"\x07" * 3072
    i8 = b"cnumpy\ndtype\nX\x02\x00\x00\x00i8\x85R"
    data = NDARRAY + b"(" + int4(n) + b"M\x00\x0c\x86" + u1 + row + int4(0) + int4(0) + int4(1) + b"\x86tR"
    labels = NDARRAY + b"(" + int4(n) + b"\x85" + i8 + b"C\x08" + b"\x03" + b"\0" * 7 + int4(0) + int4(0) + b"\x85tR"
    target = write_test_batch(tmp_path, batch2(data, labels))
    refused(lambda: load_test(tmp_path), str(target), "refusing to call numpy.ndarray", peak_below=16 * MiB)


def test_a_dtype_state_that_flags_bytes_as_objects_is_refused(tmp_path: Path) -> None:
    """numpy copies the flags in a dtype's pickled state as they stand: 0x3f makes a uint8 dtype one that
    holds objects, so numpy would read the data bytes as pointers."""
    target = write_test_batch(tmp_path, batch2(array2((1, 3072), b"u1", b"\0" * 3072, flags=0x3F), int_list([0])))
    refused(lambda: load_test(tmp_path), str(target), "dtype whose pickled state numpy never writes")


def test_reencoding_one_string_is_bounded(tmp_path: Path) -> None:
    """``_codecs.encode`` copies its text each call; 40 calls on one memoised 4 MiB string asked for 160 MiB
    (a file at the size limit could ask for terabytes), now refused at the budget of one batch file."""
    size, copies = 4 * MiB, 40
    payload = b"\x80\x02X" + struct.pack("<I", size) + b"a" * size + b"q\x00"
    payload += b"c_codecs\nencode\nq\x01X\x06\x00\x00\x00latin1q\x02]("
    payload += b"h\x01h\x00h\x02\x86R" * copies + b"e."
    target = write_test_batch(tmp_path, payload)
    message = refused(lambda: load_test(tmp_path), str(target), peak_below=MAX_CIFAR_BATCH_BYTES + 16 * MiB)
    assert f"encodes more than {MAX_CIFAR_BATCH_BYTES} bytes" in message


@pytest.mark.parametrize(
    "payload, message",
    [
        (RECONSTRUCT + b"cnumpy\ndtype\n" + text2(b"u1") + b"\x85R" + b")" + text2(b"b") + b"\x87R.", "numpy array"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_8\x86R.", "text to latin1"),
        (batch2(array2((2, 3072), b"u1", b"\0" * 100), int_list([0, 1])), "100 data bytes"),
        (batch2(array2((1, 3072), b"O", b"\0" * 3072, flags=0x3F), int_list([0])), "data: a uint8 array"),
    ],
    ids=["reconstruct-a-dtype", "encode-to-utf8", "short-array-data", "object-array-state"],
)
def test_other_misuse_of_the_allowed_globals_is_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    target = write_test_batch(tmp_path, payload)
    refused(lambda: load_test(tmp_path), str(target), message)


@pytest.mark.parametrize(
    "payload",
    [
        batch2(array2((1,) * 100_000, b"u1", b"\0\0"), int_list([0])),
        batch2(array2((1, 3072), b"z" * 1_000_000, b"\0" * 3072), int_list([0])),
    ],
    ids=["a-shape-of-100000-dimensions", "a-dtype-named-by-a-megabyte"],
)
def test_a_refusal_does_not_quote_what_the_file_made_as_long_as_it_liked(tmp_path: Path, payload: bytes) -> None:
    target = write_test_batch(tmp_path, payload)
    with pytest.raises(CertkitError) as refusal:
        load_test(tmp_path)
    assert len(str(refusal.value)) < 300 + len(str(target)), str(refusal.value)[:300]


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10: counts and labels
# ----------------------------------------------------------------------------------------------------------


def test_a_label_beyond_int64_is_refused(tmp_path: Path) -> None:
    data = np.zeros((2, 3072), dtype=np.uint8)
    target = write_test_batch(tmp_path, pickle.dumps({b"data": data, b"labels": [0, 10**30]}, protocol=2))
    refused(lambda: load_test(tmp_path), str(target), f"labels outside 0..9 (found {10**30})")
    wrapped = np.array([0, 2**63 + 5], dtype=np.uint64)  # int64 would read it as negative
    write_test_batch(tmp_path, pickle.dumps({b"data": data, b"labels": wrapped}, protocol=2))
    refused(lambda: load_test(tmp_path), str(target), f"labels outside 0..9 (found {2**63 + 5})")


def test_a_batch_of_more_than_ten_thousand_images_is_refused(tmp_path: Path) -> None:
    n = CIFAR_BATCH_IMAGES + 1
    batch = {b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": [0] * n}
    target = write_test_batch(tmp_path, pickle.dumps(batch, protocol=4))
    refused(lambda: load_test(tmp_path), str(target), f"holds {n} images; a CIFAR-10 batch holds 10000")


def test_training_batches_of_different_sizes_are_refused(tmp_path: Path) -> None:
    """Test sets smaller than CIFAR-10's are fine (the tests' own), but the five training batches of one set
    hold equally many images."""
    folder = make_cifar_dataset(tmp_path, per_batch=4) / "cifar-10-batches-py"
    make_cifar_dataset(tmp_path / "other", per_batch=3)
    os.replace(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_4", folder / "data_batch_4")
    refused(
        lambda: load_dataset("cifar10", "train", data_dir=tmp_path),
        str(folder),
        "data_batch_1 4, data_batch_2 4, data_batch_3 4, data_batch_4 3, data_batch_5 4",
    )


# ----------------------------------------------------------------------------------------------------------
# Files that are not regular, or fail on read
# ----------------------------------------------------------------------------------------------------------


def test_a_cifar_batch_that_fails_on_read_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable batch (EACCES for a user, EIO on a failing disk) is reported naming the file."""
    make_cifar_dataset(tmp_path, per_batch=2)

    def failing_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(certkit.data, "open", failing_open, raising=False)
    refused(lambda: load_test(tmp_path), "test_batch: cannot read it (Permission denied)")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-loop"])
def test_a_data_file_that_is_not_regular_is_not_called_missing(tmp_path: Path, kind: str) -> None:
    idx_root = make_idx_dataset(tmp_path / "m")
    cifar = make_cifar_dataset(tmp_path / "c", per_batch=2) / "cifar-10-batches-py"
    expected = {"fifo": "not a regular file", "directory": "is a directory", "symlink-loop": "cannot use it"}[kind]
    for path, load in (
        (idx_root / "t10k-labels-idx1-ubyte.gz", lambda: load_dataset("mnist", "test", data_dir=idx_root)),
        (cifar / "test_batch", lambda: load_dataset("cifar10", "test", data_dir=cifar)),
    ):
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        else:
            os.symlink(path, path)
        message = refused(load, str(path), expected)
        assert "missing" not in message


def image_folder(tmp_path: Path) -> Path:
    from PIL import Image

    val = tmp_path / "val" / "n01"
    val.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(val / "a.JPEG")
    return val / "b.JPEG"


@pytest.mark.parametrize("kind", ["symlink-loop", "dangling-symlink", "fifo"])
def test_an_image_name_that_is_no_file_is_refused_before_certifying(tmp_path: Path, kind: str) -> None:
    """``dataset_identity`` runs before the result file is opened; it read each image's size unguarded."""
    image = image_folder(tmp_path)
    if kind == "fifo":
        os.mkfifo(image)
    else:
        os.symlink(image if kind == "symlink-loop" else tmp_path / "nowhere.JPEG", image)
    expected = "not a regular file" if kind == "fifo" else "cannot"
    refused(lambda: dataset_identity(load_dataset("imagenet", "test", data_dir=tmp_path)), str(image), expected)


def test_a_fifo_named_like_an_image_does_not_block_the_reader(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes; the reader refuses it before opening. Read in a thread so
    that a reader that does block fails the test rather than hanging it."""
    fifo = image_folder(tmp_path)
    os.mkfifo(fifo)
    ds = load_dataset("imagenet", "test", data_dir=tmp_path)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            ds[1]
            outcome.append(None)
        except Exception as e:  # the assertions below say which
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    if reader.is_alive():
        with open(fifo, "wb"):  # a writer releases the blocked reader, which then reads an empty file
            pass
        reader.join()
        pytest.fail(f"reading {fifo} blocked")
    (raised,) = outcome
    assert isinstance(raised, CertkitError) and str(raised).startswith(f"{fifo}: is not a regular file"), raised
