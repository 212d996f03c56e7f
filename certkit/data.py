"""Datasets by name, held where training happens.

``load_dataset(name, split)`` returns a torch ``Dataset`` (``len()``, ``dataset[i] -> (image, label)``,
what certification reads) with ``batches(...)`` for training. Your own torch ``Dataset`` or ``DataLoader``
trains through :class:`TorchData`, which gives it the same ``batches(...)``. Small datasets (MNIST,
Fashion-MNIST, CIFAR-10) are held as one uint8 tensor on the training device and batched from there, with
CIFAR-10's random crop (padding 4) and horizontal flip done on whole batches (the airbench recipe: no
DataLoader, no per-image PIL work).
ImageNet uses torchvision's folder loader and transforms. Images are always float in [0, 1]; the model's
first layer normalizes, so noise and radii are in pixel units.

Nothing is ever downloaded: a missing or corrupt file raises :class:`CertkitError` naming the file and what
was expected. The CIFAR-10 python batches are pickles; they are read with an unpickler that can only
rebuild arrays of plain numbers, lists, dicts and strings, and that hands no numpy global to the file (its
arrays are built by certkit from bytes of the declared size), so a tampered batch file can neither run
code nor make numpy read memory the file chose.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import pickle
import pickletools
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from certkit.errors import CertkitError, first_line
from certkit.fileio import require_regular

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shape, classes and its normalization constants."""

    name: str
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: recipe family for method defaults: 'mnist' (MNIST-like), 'cifar10' or 'imagenet'
    family: str
    default_root: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.0,), (1.0,), "mnist", FASHION_MNIST_ROOT),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.0,), (1.0,), "mnist"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar10"),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet"),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise CertkitError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_root(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir`` wins, then ``$CERTKIT_DATA``, then the dataset's default location."""
    info = dataset_info(name)
    root = data_dir or os.environ.get("CERTKIT_DATA") or info.default_root
    if not root:
        raise CertkitError(f"dataset {name!r} has no default location: pass --data-dir DIR or set CERTKIT_DATA")
    return Path(root)


# --------------------------------------------------------------------------------------------------------
# Dataset objects
# --------------------------------------------------------------------------------------------------------
@dataclass
class ArrayDataset:
    """A whole dataset as one ``uint8`` tensor ``(N, C, H, W)`` plus ``int64`` labels, on one device.

    ``augment=True`` applies CIFAR-style random crop (zero padding 4) and horizontal flip to every training
    batch, as batched tensor operations.
    """

    info: DatasetInfo
    images: Tensor
    labels: Tensor
    augment: bool = False
    split: str = "train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise CertkitError(f"{self.info.name}: images must be a uint8 (N, C, H, W) tensor")
        if tuple(self.images.shape[1:]) != self.info.in_shape:
            raise CertkitError(
                f"{self.info.name}: images have shape {tuple(self.images.shape[1:])}, expected {self.info.in_shape}"
            )
        if len(self.images) != len(self.labels):
            raise CertkitError(f"{self.info.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.info.num_classes):
            raise CertkitError(f"{self.info.name}: labels outside 0..{self.info.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.info, self.images.to(device), self.labels.to(device), self.augment, self.split)

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n`` images (all when ``n`` is None or larger than the dataset)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise CertkitError(f"subset size must be >= 1 (got {n})")
        return ArrayDataset(self.info, self.images[:n], self.labels[:n], self.augment, self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Image ``i`` as float ``(C, H, W)`` in [0, 1] and its label (no augmentation)."""
        return self.images[i].float().div_(255), int(self.labels[i])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Float batches in [0, 1] on the dataset's device; one ``randperm`` per epoch when shuffling.

        ``rank``/``world_size`` give each DDP process a disjoint, equally sized share of the same permutation.
        """
        order = epoch_order(len(self), shuffle, generator, rank, world_size).to(self.device)
        # the permutation is the same on every rank; the crops and flips are each rank's own, drawn from a
        # stream the shared generator seeds apart per rank
        crops = generator
        if self.augment and generator is not None:
            crops = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)) + rank)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            x = self.images[idx].float().div_(255)
            if self.augment:
                x = random_crop_flip(x, padding=4, generator=crops)
            yield x, self.labels[idx]


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world_size: int = 1) -> Tensor:
    """The indices one process reads in an epoch: one ``randperm`` when shuffling, and under DDP an equal,
    disjoint share of that same permutation per rank (the remainder is dropped, as DistributedSampler)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size
        order = order[rank * per_rank : (rank + 1) * per_rank]
    return order


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _open_image(path: str) -> Any:
    """torchvision's PIL loader, but a file that does not decode is a one-line error naming it (a corrupt
    or truncated image is the user's to fix, like any other malformed dataset file)."""
    from PIL import Image, UnidentifiedImageError

    require_regular(path, "image")  # opening a FIFO would block for ever
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL's decoders raise
        why = "no image format PIL knows" if isinstance(e, UnidentifiedImageError) else first_line(e)
        raise CertkitError(f"{path}: not a readable image ({why})") from None


class _Transformed(TorchDataset):
    """An ImageFolder's items through ``transform``: what :class:`FolderDataset` and its DataLoader workers
    read. The folder holds undecoded file names only, so the augmented and the plain view share one scan."""

    def __init__(self, folder: Any, transform: Callable[[Any], Tensor]) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.folder[i]
        return self.transform(image), int(label)


@dataclass
class FolderDataset:
    """ImageNet-style ``train/`` and ``val/`` class folders through torchvision's ImageFolder.

    Too large to hold in memory, so batches come from a multi-worker DataLoader. ``augment=True`` gives
    the batches random resized crop 224 + flip; items (``dataset[i]``, what certification reads) and
    unaugmented batches are resize 256 + center crop 224, the same every time, as for the held datasets. No
    normalization (the model does it). An image that does not decode is a one-line error naming its file,
    also when a DataLoader worker reads it.
    """

    info: DatasetInfo
    root: Path
    split: str = "train"
    workers: int = 4
    limit: int | None = None
    augment: bool = False
    _folder: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from torchvision import datasets

        split_dir = self.root / ("train" if self.split == "train" else "val")
        if not split_dir.is_dir():
            raise CertkitError(
                f"{split_dir}: missing; expected ImageNet class folders under {self.root}/train and /val"
            )
        if self._folder is not None:  # a subset shares its parent's scan of the folders
            return
        try:
            self._folder = datasets.ImageFolder(str(split_dir), loader=_open_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise CertkitError(f"{split_dir}: {e}") from None

    @property
    def classes(self) -> list[str]:
        return list(self._folder.classes)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        n = len(self._folder)  # type: ignore[arg-type]
        return n if self.limit is None else min(n, self.limit)

    def subset(self, n: int | None) -> FolderDataset:
        if n is None:
            return self
        if n < 1:
            raise CertkitError(f"subset size must be >= 1 (got {n})")
        return dataclasses.replace(self, limit=n)

    def to(self, device: torch.device | str) -> FolderDataset:
        self._device = torch.device(device)
        return self

    def _items(self, augment: bool) -> _Transformed:
        from torchvision import transforms

        size = self.info.in_shape[1]
        if augment:
            steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size)]
        return _Transformed(self._folder, transforms.Compose([*steps, transforms.ToTensor()]))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Image ``i`` as float ``(C, H, W)`` in [0, 1] and its label (no augmentation)."""
        return self._items(augment=False)[i]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(self), shuffle, generator, rank, world_size).tolist()
        device = getattr(self, "_device", torch.device("cpu"))
        items = self._items(self.augment)
        loader: DataLoader[tuple[Tensor, Tensor]] = DataLoader(
            Subset(items, order),
            batch_size=batch_size,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            drop_last=drop_last,
        )
        served = 0
        try:
            for x, y in loader:
                served += 1
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        except CertkitError:
            # torch re-raises a worker's error with the worker's traceback as its message; decoding the batch
            # that failed here raises the error itself, the one line naming the file
            for i in order[served * batch_size : (served + 1) * batch_size]:
                items[i]
            raise


Dataset = ArrayDataset | FolderDataset


class TrainingData(Protocol):
    """What the trainer reads: certkit's datasets, or any torch data through :class:`TorchData`."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...
    def to(self, device: torch.device | str) -> Any: ...
    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Tensor, Tensor]]: ...


class TorchData:
    """Your own torch ``Dataset`` (items: float image ``(C, H, W)`` in [0, 1], int label) or ``DataLoader``,
    batched for the trainer.

    A ``Dataset`` is shuffled like certkit's own (one ``randperm`` from the trainer's seeded generator per
    epoch, an equal share per DDP rank), so a resumed run sees the same order. A ``DataLoader`` is used as
    it is: its own batch size, order and workers (one process only, since it does not know the ranks).
    """

    def __init__(self, data: TorchDataset | DataLoader) -> None:
        self.data = data
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def dataset(self) -> TorchDataset:
        return self.data.dataset if isinstance(self.data, DataLoader) else self.data

    @property
    def own_batch_size(self) -> int | None:
        """The batch size a ``DataLoader`` decides for itself (None for a ``Dataset``, or a loader batched by
        a sampler of its own)."""
        return self.data.batch_size if isinstance(self.data, DataLoader) else None

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def to(self, device: torch.device | str) -> TorchData:
        self.device = torch.device(device)
        return self

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(self.data, DataLoader):
            if world_size > 1:
                raise CertkitError("a DataLoader cannot be split between processes; pass its Dataset under torchrun")
            loader: DataLoader[Any] = self.data
        else:
            order = epoch_order(len(self), shuffle, generator, rank, world_size)
            loader = DataLoader(Subset(self.data, order.tolist()), batch_size=batch_size, drop_last=drop_last)
        for x, y in loader:
            yield x.to(self.device).float(), torch.as_tensor(y).to(self.device).long()


def as_training_data(data: Any) -> TrainingData:
    """certkit's datasets as they are; a torch ``Dataset`` or ``DataLoader`` through :class:`TorchData`."""
    if hasattr(data, "batches"):
        return data
    if isinstance(data, (TorchDataset, DataLoader)) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return TorchData(data)
    raise CertkitError(f"training data must be a torch Dataset or DataLoader, not {type(data).__name__}")


def check_item(item: Any, where: str = "dataset item 0") -> tuple[Tensor, int]:
    """An item as (image, label), or a one-line error saying what it should be; warns on pixels outside [0, 1]."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise CertkitError(f"{where}: expected (image, label), got {type(item).__name__}")
    x, y = item
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise CertkitError(f"{where}: expected a float image tensor (C, H, W), got {shape}")
    low, high = float(x.min()), float(x.max())
    cause = off_scale_cause(low, high)
    if cause:
        warnings.warn(
            f"{where}: pixel values span [{low:g}, {high:g}], outside [0, 1] ({cause}); "
            "sigma and radii are in [0, 1] pixel units",
            stacklevel=3,
        )
    return x, class_label(y, where)


def class_label(y: Any, where: str) -> int:
    """A label as a class index: an integer or a one-element integer tensor (a one-hot or soft label is not
    one: every objective and certificate here is about a single true class)."""
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() and y.dtype != torch.bool:
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    got = f"a tensor of shape {tuple(y.shape)} ({y.dtype})" if isinstance(y, Tensor) else type(y).__name__
    raise CertkitError(f"{where}: the label must be a class index (an integer), got {got}")


def check_fit(
    model: nn.Module,
    others: Mapping[str, nn.Module],
    image: Tensor,
    label: int,
    num_classes: int | None,
    where: str = "dataset item 0",
) -> int:
    """One image through ``model`` (and ``others``, e.g. a teacher) in eval mode: the class count, or a
    one-line error for a model that does not fit the image, logits of the wrong width, or a bad label.

    Eval mode and no gradients, so batch statistics, parameters and the random streams are untouched.
    """
    widths = {}
    for name, module in {"model": model, **others}.items():
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(image.unsqueeze(0))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise CertkitError(
                f"the {name} does not fit images of shape {tuple(image.shape)}: {first_line(e)}"
            ) from None
        finally:
            module.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CertkitError(f"the {name} must return logits of shape (N, classes), got {shape} for one image")
        widths[name] = int(out.shape[1])
    classes = widths["model"] if num_classes is None else int(num_classes)
    for name, width in widths.items():
        if width != classes:
            raise CertkitError(f"the {name} outputs {width} logits but the dataset has {classes} classes")
    if not 0 <= label < classes:
        raise CertkitError(f"{where} has label {label}, outside 0..{classes - 1}")
    return classes


def off_scale_cause(low: float, high: float) -> str | None:
    """The likely reason pixels span [low, high] instead of [0, 1], or None if they don't.

    Noise and every radius are in [0, 1] pixel units, so images on another scale train and certify without an
    error, in units nobody asked for. A negative value is the mark of normalized images (their maximum passes
    2 for MNIST or CIFAR-10 statistics, so the maximum alone would misread them as 0-255).
    """
    if low >= 0 and high <= 1:
        return None
    if low < 0:
        return "normalized images? certkit normalizes inside the model"
    if high > 1.5:
        return "0-255 pixels? divide by 255"
    return "pixels a little above 1? clamp them to [0, 1]"


def check_pixels(x: Tensor, where: str) -> None:
    """Refuse integer images and warn on float images outside [0, 1] before certification.

    An integer image would be promoted silently and certified in 0-255 units: a uint8 image certifies at the
    largest radius n allows, since noise of sigma 0.25 is nothing on that scale. The warning's text is the
    same for every input and is raised here (``stacklevel=1``), so Python's warning registry shows it once per
    process however many images or batches carry it.
    """
    if not x.is_floating_point():
        raise CertkitError(
            f"{where}: {str(x.dtype).removeprefix('torch.')} pixels; certkit certifies float images in [0, 1] "
            "(divide by 255)"
        )
    if x.numel() == 0:
        return
    cause = off_scale_cause(float(x.min()), float(x.max()))
    if cause:
        warnings.warn(
            f"certification inputs have pixel values outside [0, 1] ({cause}); sigma and radii are in [0, 1] "
            "pixel units",
            stacklevel=1,
        )


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------
def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    augment: bool | None = None,
) -> Dataset:
    """Load ``split`` ('train' or 'test') of dataset ``name`` from local files.

    ``augment`` (random crops and flips of the training batches; items are never augmented) defaults to True
    for the CIFAR-10 and ImageNet training splits (the reference recipes) and False otherwise.
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise CertkitError(f"split must be 'train' or 'test' (got {split!r})")
    root = resolve_root(name, data_dir)
    augment = split == "train" and info.family != "mnist" if augment is None else augment
    if info.name in ("fashion-mnist", "mnist"):
        images, labels = read_idx_pair(root, split, info.name)
        ds: Dataset = ArrayDataset(info, images, labels, augment, split)
    elif info.name == "cifar10":
        images, labels = read_cifar10(root, split)
        ds = ArrayDataset(info, images, labels, augment, split)
    else:
        ds = FolderDataset(info, root, split, augment=augment)
    return ds.to(device) if device is not None else ds


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: the folder torchvision downloads each IDX dataset to, under its root: ``root/FashionMNIST/raw/``
_TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
#: most data bytes one IDX file may declare: ten splits of 60,000 28x28 images (0.44 GiB), so a crafted
#: header cannot make the reader allocate more
MAX_IDX_BYTES = 600_000 * 28 * 28


def _find(root: Path, stem: str, name: str) -> Path:
    folders = [root, root / _TORCHVISION_FOLDERS[name] / "raw"]
    for candidate in (folder / f"{stem}{suffix}" for folder in folders for suffix in (".gz", "")):
        if _require_file(candidate, "IDX file"):
            return candidate
    hint = ""
    if str(root) == FASHION_MNIST_ROOT:
        hint = f" (install the Debian package {FASHION_MNIST_PACKAGE}, or pass --data-dir)"
    raise CertkitError(
        f"{root / (stem + '.gz')}: missing; expected the gzipped IDX file in {root} or {folders[1]}{hint}"
    )


def read_idx(path: str | os.PathLike, item_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into an array, checking its header first.

    The header declares the shape, so the data size is known before any of it is decompressed: items of
    another shape than ``item_shape`` (when given) or more than :data:`MAX_IDX_BYTES` are refused, and the
    stream is read only up to one byte past the declared size, so a gzip bomb costs no more memory than a
    real file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise CertkitError(f"{path}: truncated; expected an IDX header")
            zero, dtype_code, ndim = struct.unpack(">HBB", magic)
            if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
                raise CertkitError(f"{path}: bad IDX magic; expected unsigned-byte data with 1 or 3 dimensions")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise CertkitError(f"{path}: truncated IDX header; expected {ndim} dimensions")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            if item_shape is not None and dims[1:] != item_shape:
                raise CertkitError(f"{path}: items of shape {dims[1:]}, expected {item_shape}")
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise CertkitError(
                    f"{path}: declares {expected} data bytes, more than the {MAX_IDX_BYTES} certkit reads"
                )
            body = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise CertkitError(f"{path}: not a readable {'gzip' if opener is gzip.open else 'IDX'} file ({e})") from None
    if len(body) != expected:
        found = "more" if len(body) > expected else f"{len(body)}"
        raise CertkitError(f"{path}: has {found} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(body, dtype=np.uint8, count=expected).reshape(dims)


def read_idx_pair(root: Path, split: str, name: str = "fashion-mnist") -> tuple[Tensor, Tensor]:
    img_path, lbl_path = (_find(root, stem, name) for stem in _IDX_FILES[split])
    images, labels = read_idx(img_path, (28, 28)), read_idx(lbl_path, ())
    if len(images) == 0:
        raise CertkitError(f"{img_path}: declares 0 images")
    if len(labels) != len(images):
        raise CertkitError(f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}")
    _check_labels(lbl_path, labels)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


#: largest CIFAR-10 batch file read (a real one is 31 MB) and most pickle opcodes in it (a real one has
#: about 40,000: one for the image bytes, a few per label and file name); together they bound what the
#: unpickler builds, whatever the file asks for
MAX_CIFAR_BATCH_BYTES = 64 << 20
MAX_PICKLE_OPS = 200_000
#: images in each CIFAR-10 batch file, the five training batches and the test batch alike
CIFAR_BATCH_IMAGES = 10_000


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a batch. numpy's array reconstructor is handed the class by name, but
    the class itself, called with a buffer, builds an array over memory the file chooses (an object array of
    forged pointers that crashes the interpreter, a huge array of zero strides), so the file never gets it."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray")


def _text(value: object) -> object:
    """A batch written by Python 2 spells its strings as bytes (read with ``encoding='bytes'``)."""
    return value.decode("latin1") if isinstance(value, bytes) else value


class _Dtype:
    """A dtype the file names, kept away from numpy: numpy's own dtype unpickling lets the file's state set
    the dtype's flags, and a uint8 dtype flagged as holding objects makes numpy read the bytes as pointers.
    The file's state is accepted only when it is the one numpy writes for that dtype."""

    def __init__(self, name: object, align: object = False, copy: object = False) -> None:
        name = _text(name)
        if not isinstance(name, str):
            raise pickle.UnpicklingError(f"refusing a dtype named by {type(name).__name__}")
        try:  # numpy's own error would quote the name, as long as the file made it
            self.dtype = np.dtype(name)
        except TypeError:
            raise pickle.UnpicklingError("refusing an unknown dtype") from None
        #: plain numbers: no objects, fields, sub-arrays or dates, so any bytes are a valid value
        self.plain = self.dtype.kind in "biuf" and self.dtype.fields is None and self.dtype.subdtype is None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or tuple(map(_text, state)) != self.dtype.__reduce__()[2]:
            raise pickle.UnpicklingError(f"refusing a {self.dtype} dtype whose pickled state numpy never writes")


class _PendingArray:
    """What numpy's ``_reconstruct`` returns, before the pickle's state fills it in: the array is built here
    from the state's bytes (a read-only view, no copy), and only for a plain dtype and bytes of exactly the
    shape's size. Any other state (an object array's list, say) leaves no array, which the batch's checks
    then refuse as not image data or labels."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]  # the format version numpy has written since 2006; older files lack it
        if not isinstance(state, tuple) or len(state) != 4:
            raise pickle.UnpicklingError("refusing an array state that numpy never writes")
        shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise pickle.UnpicklingError("refusing an array whose shape is not a tuple of sizes")
        if not (isinstance(dtype, _Dtype) and dtype.plain and isinstance(raw, bytes)):
            return
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(f"{len(raw)} data bytes, not the number its shape and dtype need")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays of numbers and plain containers through certkit's own stand-ins for the few
    globals a batch names; no global is ever imported, so no code can run, and what the file builds is
    bounded by its size, its opcode count and one budget for the bytes that ``_codecs.encode`` copies."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._encoded = 0

    def _encode(self, text: object, encoding: object = "utf-8") -> bytes:
        """``_codecs.encode``, how Python 3 spells bytes in a protocol 2 pickle (latin-1 text). Each call
        copies, so a file encoding one long string many times would otherwise ask for terabytes."""
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError("refusing _codecs.encode of anything but text to latin1")
        self._encoded += len(text)
        if self._encoded > MAX_CIFAR_BATCH_BYTES:
            raise pickle.UnpicklingError(f"encodes more than {MAX_CIFAR_BATCH_BYTES} bytes")
        return text.encode("latin1")

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> _PendingArray:
        """numpy's array reconstructor, which allocates ``shape`` of ``dtype`` (a placeholder ``(0,)`` of
        int8 in every file numpy writes); here nothing is allocated, and a dtype other than plain numbers is
        refused. A method, like ``_encode``: a file's state (BUILD) cannot set a bound method's attributes, so
        it cannot change the defaults of a function that every later read shares."""
        if not isinstance(subtype, _NdarrayName):
            raise pickle.UnpicklingError("refusing to reconstruct anything but a numpy array")
        named = dtype if isinstance(dtype, _Dtype) else _Dtype(dtype)
        if not named.plain:
            raise pickle.UnpicklingError(f"refusing an array of dtype {named.dtype}")
        return _PendingArray()

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return self._reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return _NdarrayName()
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        if (module, name) == ("_codecs", "encode"):
            return self._encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _require_file(path: Path, what: str) -> bool:
    """Whether ``path`` is a regular file (False when nothing is there); a path that exists but is another
    kind (a FIFO, which blocks a reader forever, a directory, a device, a symlink loop) is refused. Under a
    folder that is a file nothing is there, and the caller's message for a missing file says so."""
    if path.is_file():
        return True
    if os.path.lexists(path):
        require_regular(path, what)
    return False


def _unpickle_batch(path: Path) -> object:
    """The batch's object, after checking the file's size and opcode count against the limits above: each
    opcode builds at most one object, so the count bounds the objects (shared nested lists included)."""
    try:
        size = path.stat().st_size
        if size > MAX_CIFAR_BATCH_BYTES:
            raise CertkitError(
                f"{path}: {size} bytes, larger than any CIFAR-10 batch ({MAX_CIFAR_BATCH_BYTES} at most)"
            )
        with open(path, "rb") as f:
            data = f.read(size)  # a file that grew since would be cut short and fail to unpickle
        for count, _ in enumerate(pickletools.genops(data), start=1):
            if count > MAX_PICKLE_OPS:
                raise CertkitError(f"{path}: more than {MAX_PICKLE_OPS} pickle operations; not a CIFAR-10 batch")
        batch = _ArrayOnlyUnpickler(data).load()
    except CertkitError:
        raise
    except OSError as e:
        raise CertkitError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # any unpickling failure means a corrupt or hostile file
        raise CertkitError(f"{path}: not a CIFAR-10 batch ({first_line(e)})") from None
    if isinstance(batch, dict):
        return {k: v.array if isinstance(v, _PendingArray) else v for k, v in batch.items()}
    return batch


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not _require_file(path, "CIFAR-10 batch"):
        raise CertkitError(f"{path}: missing; expected a CIFAR-10 python batch (cifar-10-batches-py)")
    batch = _unpickle_batch(path)
    if not isinstance(batch, dict):
        raise CertkitError(f"{path}: not a CIFAR-10 batch (expected a dict with data and labels)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CertkitError(f"{path}: not a CIFAR-10 batch (expected data: a uint8 array of shape (N, 3072))")
    if not _integer_labels(labels):
        raise CertkitError(f"{path}: not a CIFAR-10 batch (expected labels: a flat list of integers)")
    if len(labels) != len(data):
        raise CertkitError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) == 0:
        raise CertkitError(f"{path}: holds 0 images")
    if len(labels) > CIFAR_BATCH_IMAGES:
        raise CertkitError(f"{path}: holds {len(labels)} images; a CIFAR-10 batch holds {CIFAR_BATCH_IMAGES}")
    _check_labels(path, labels)
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _integer_labels(labels: object) -> TypeGuard[np.ndarray | list[int]]:
    """A flat list of Python ints (how CIFAR-10 stores them) or a 1-d integer array."""
    if isinstance(labels, list):
        return all(type(v) is int for v in labels)
    return isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu"


def _check_labels(path: Path, labels: np.ndarray | list[int]) -> None:
    """The labels of a ten-class file (MNIST-like, CIFAR-10), refused naming the file, which the held
    dataset's own label check no longer knows. A list is checked as Python ints, before any conversion
    to int64 could overflow."""
    low, high = (min(labels), max(labels)) if isinstance(labels, list) else (int(labels.min()), int(labels.max()))
    if low < 0 or high > 9:
        raise CertkitError(f"{path}: labels outside 0..9 (found {low if low < 0 else high})")


def read_cifar10(root: Path, split: str) -> tuple[Tensor, Tensor]:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / n) for n in names]
    counts = {n: len(p[1]) for n, p in zip(names, parts, strict=True)}
    if len(set(counts.values())) > 1:
        # a real set holds 10,000 in each; small test sets hold fewer, but a set of unequal batches is cut short
        listed = ", ".join(f"{n} {c}" for n, c in counts.items())
        raise CertkitError(f"{folder}: the training batches hold different numbers of images ({listed})")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)
