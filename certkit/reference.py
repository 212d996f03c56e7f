"""The ``.pth.tar`` layout of the field's reference code bases: read it into certkit models, write it back.

Cohen et al. (locuslab/smoothing) and the code bases built on it (SmoothAdv, Consistency, SmoothMix, CRT)
save ``torch.save({'epoch', 'arch', 'state_dict', ...})`` where the state dict is that of
``Sequential(first layer, net)``, sometimes from ``DataParallel`` (a ``module.`` prefix) and, for ImageNet,
with the ``DataParallel`` inside the ``Sequential`` (``1.module.``). MACER saves the bare net under
``'net'``, with no first layer at all. CRT's files carry no ``'arch'``.

The first layer keeps its constants as plain attributes, so the file holds neither its kind nor its
values: they come from the dataset and from ``normalization`` (see :data:`NORMALIZATIONS`). Getting this
wrong is silent in the reference code (about 30% accuracy on released models), so certkit says which one
it assumed whenever the choice changes the logits.

Files are read only with ``torch.load(weights_only=True)``; :func:`export_checkpoint` writes the pickle
layout the reference ``certify.py`` scripts read, which holds only tensors and plain values.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkit.checkpoint import load_with_meta, make_meta, read_meta
from certkit.data import DatasetInfo, dataset_info
from certkit.errors import CertkitError, first_line
from certkit.fileio import atomic_write_bytes, check_output, sha256_file
from certkit.models import create_model, model_spec

#: The first layers of the reference code bases, by what they compute:
#: ``standard`` is ``(x - mu) / sigma`` (``NormalizeLayer``), ``center`` is ``x - mu`` (``InputCenterLayer``),
#: ``none`` passes pixels through (``Identity``, or no first layer).
NORMALIZATIONS = ("standard", "center", "none")

#: Help text shared by the CLI and the README: which sources use which first layer.
NORMALIZATION_HELP = (
    "input layer of a reference checkpoint: standard = (x-mu)/sigma (NormalizeLayer: Cohen et al., "
    "Consistency, SmoothMix, CRT), center = x-mu (InputCenterLayer: Salman et al.'s SmoothAdv ImageNet models and "
    "CIFAR-10 models trained from scratch), none = raw pixels (MACER). On MNIST-like datasets all three are the "
    "reference Identity. Default: standard when the file holds Sequential(layer, net) keys, none when it holds a "
    "bare net (MACER); on CIFAR-10/ImageNet the assumed layer is printed as a warning"
)


@dataclass(frozen=True)
class ReferenceArch:
    """How one reference architecture's state-dict keys correspond to a certkit architecture's."""

    #: certkit's architecture name
    arch: str
    #: (reference module prefix, certkit module prefix) pairs; names not listed are the same in both
    renames: tuple[tuple[str, str], ...] = ()
    #: the reference keeps this net in ``DataParallel`` inside its ``Sequential`` (Cohen et al.'s ImageNet)
    inner_module: bool = False


#: The reference LeNet (SmoothMix/MACER ``archs/lenet.py``) names its layers ``conv1, conv2, fc1, fc2``;
#: certkit's groups them into ``features`` and ``classifier`` Sequentials.
_LENET = ReferenceArch(
    "lenet",
    (("conv1.", "features.0."), ("conv2.", "features.3."), ("fc1.", "classifier.1."), ("fc2.", "classifier.3.")),
)

#: reference architecture names (which include certkit's names of the same nets) -> how to read them.
#: CIFAR ResNets and torchvision ResNets already share the reference layer names.
REFERENCE_LAYOUTS: dict[str, ReferenceArch] = {
    "lenet": _LENET,
    **{f"cifar_resnet{d}": ReferenceArch(f"resnet{d}") for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": ReferenceArch(f"resnet{d}") for d in (20, 32, 44, 56, 110)},  # CRT's and MACER's names
    "resnet18": ReferenceArch("resnet18"),
    "resnet50": ReferenceArch("resnet50", inner_module=True),
}

#: reference architecture names -> certkit's
REFERENCE_ARCHS = {name: layout.arch for name, layout in REFERENCE_LAYOUTS.items()}

#: certkit architectures the reference ``certify.py`` (``architectures.get_architecture``) can build, by
#: the name it knows them under
EXPORT_NAMES = {"lenet": "lenet", "resnet20": "cifar_resnet20", "resnet110": "cifar_resnet110", "resnet50": "resnet50"}


def _layout(name: str, where: str) -> ReferenceArch:
    if name not in REFERENCE_LAYOUTS:
        raise CertkitError(
            f"{where}: unsupported architecture {name!r}; supported: {', '.join(sorted(REFERENCE_LAYOUTS))}"
        )
    return REFERENCE_LAYOUTS[name]


def _rename(key: str, pairs: Sequence[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def check_fits_dataset(where: str, num_classes: int, in_shape: Sequence[int], info: DatasetInfo) -> None:
    """Refuse, in one line and before any work, a model whose class count or input shape is not the dataset's."""
    if int(num_classes) != info.num_classes:
        raise CertkitError(f"{where}: model has {num_classes} classes, dataset {info.name} has {info.num_classes}")
    if tuple(int(v) for v in in_shape) != tuple(info.in_shape):
        raise CertkitError(
            f"{where}: model takes inputs of shape {tuple(in_shape)}, dataset {info.name} has {tuple(info.in_shape)}"
        )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the checkpoint dict, its state dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, i.e. running the file's code
        raise CertkitError(
            f"{path}: refused: it holds pickled objects other than tensors and plain containers, and certkit "
            "never runs code from a checkpoint"
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise CertkitError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    state = ckpt.get("state_dict", ckpt.get("net")) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CertkitError(
            f"{path}: expected a dict with 'state_dict' (or MACER's 'net'), the reference checkpoint format"
        )
    bad = next((k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise CertkitError(f"{path}: the state_dict must map names (strings) to tensors; entry {bad!r} does not")
    return ckpt, state


def _body_state(
    path: Path, state: dict[str, Any], layout: ReferenceArch
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Strip the wrappers and rename: (certkit body keys -> tensors, certkit key -> file key, had a first layer).

    Keys may be ``module.`` (DataParallel around everything), then ``1.`` (the net inside
    ``Sequential(first layer, net)``), then ``module.`` (DataParallel around the net), or bare (MACER).
    """
    body: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    wrapped = False
    for file_key, value in state.items():
        key = file_key.removeprefix("module.")
        if key.startswith("0."):
            raise CertkitError(
                f"{path}: the input layer holds a tensor ({file_key!r}); the reference input layers hold none"
            )
        if key.startswith("1."):
            wrapped, key = True, key[2:]
        key = _rename(key.removeprefix("module."), layout.renames)
        body[key], origin[key] = value, file_key
    return body, origin, wrapped


def _check_state(
    path: Path,
    arch: str,
    body: dict[str, torch.Tensor],
    origin: dict[str, str],
    model: nn.Sequential,
    info: DatasetInfo,
) -> None:
    """Name what does not fit: the class count, the input channels, another shape, or the key set."""
    want = model[1].state_dict()
    missing, unexpected = sorted(set(want) - set(body)), sorted(set(body) - set(want))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + (
            [f"unexpected {', '.join(origin[k] for k in unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")]
            if unexpected
            else []
        )
        raise CertkitError(f"{path}: state_dict does not fit certkit's {arch!r} ({'; '.join(parts)})")
    params = [name for name, _ in model[1].named_parameters()]
    last, first = params[-1], params[0]  # the output layer's bias, the first layer's weight
    if body[last].dim() >= 1 and body[last].shape[0] != want[last].shape[0]:  # 0-d: the shape loop names it
        raise CertkitError(
            f"{path}: checkpoint has {body[last].shape[0]} classes ({origin[last]}), "
            f"dataset {info.name} has {info.num_classes}"
        )
    if body[first].dim() > 1 and body[first].shape[1] != want[first].shape[1]:
        raise CertkitError(
            f"{path}: checkpoint takes {body[first].shape[1]}-channel inputs ({origin[first]}), "
            f"dataset {info.name} has shape {tuple(info.in_shape)}"
        )
    for key, tensor in want.items():
        if body[key].shape != tensor.shape:
            raise CertkitError(
                f"{path}: {origin[key]} has shape {tuple(body[key].shape)}, "
                f"certkit's {arch!r} on dataset {info.name}'s {tuple(info.in_shape)} inputs "
                f"expects {tuple(tensor.shape)} (the checkpoint was made for another input shape)"
            )


def _first_layer(kind: str, info: DatasetInfo) -> tuple[list[float], list[float]]:
    """(mean, std) of certkit's Normalize that computes ``kind`` exactly (std 1 divides exactly)."""
    c = info.in_shape[0]
    if kind == "standard":
        return list(info.mean), list(info.std)
    if kind == "center":
        return list(info.mean), [1.0] * c
    return [0.0] * c, [1.0] * c


def import_checkpoint(
    path: str | os.PathLike,
    dataset: str,
    *,
    arch: str | None = None,
    normalization: str | None = None,
    sigma: float | None = None,
    flags: tuple[str, str] = ("--arch", "--normalization"),
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Read a reference checkpoint into ``Sequential(Normalize, body)``; returns (model in eval mode, metadata).

    Args:
        path: a ``.pth``/``.pth.tar``/``.pt`` file, read with ``weights_only=True``.
        dataset: the dataset it was trained on (its constants, class count and input shape).
        arch: the architecture, reference or certkit name; needed when the file has no ``'arch'`` (CRT,
            MACER), and must agree with it otherwise.
        normalization: one of :data:`NORMALIZATIONS`; None picks the default of :data:`NORMALIZATION_HELP`.
        sigma: the training noise level, when known (the file does not record it).
        flags: the command-line flags that set ``arch`` and ``normalization``, named in errors and warnings
            (a CRT teacher's are ``--teacher-arch`` and ``--teacher-normalization``).
    """
    arch_flag, norm_flag = flags
    path = Path(path)
    info = dataset_info(dataset)
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise CertkitError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    ckpt, state = _read(path)
    file_arch = ckpt.get("arch")
    if file_arch is None and arch is None:
        raise CertkitError(
            f"{path}: the checkpoint does not record its architecture (CRT's and MACER's do not); pass {arch_flag} NAME"
        )
    layout = _layout(str(file_arch if file_arch is not None else arch), str(path))
    if arch is not None and _layout(arch, arch_flag).arch != layout.arch:
        raise CertkitError(f"{path}: {arch_flag} {arch} disagrees with the checkpoint's architecture {file_arch!r}")
    if model_spec(layout.arch).family == "cifar" and tuple(info.in_shape[1:]) != (32, 32):
        raise CertkitError(
            f"{path}: {layout.arch} is a CIFAR network for 32x32 inputs; "
            f"dataset {info.name} has shape {tuple(info.in_shape)}"
        )
    body, origin, wrapped = _body_state(path, state, layout)
    kind = normalization or ("standard" if wrapped else "none")
    mean, std = _first_layer(kind, info)
    model = create_model(layout.arch, info.num_classes, info.in_shape, mean, std)
    _check_state(path, layout.arch, body, origin, model, info)
    model[1].load_state_dict(body, strict=True)
    if normalization is None and _first_layer("standard", info) != _first_layer("none", info):
        warnings.warn(
            f"{path}: assuming the {kind!r} input layer (mean {mean}, std {std}); pass {norm_flag} "
            f"{'/'.join(k for k in NORMALIZATIONS if k != kind)} if the model was trained with another",
            stacklevel=2,
        )
    meta = make_meta(
        layout.arch,
        dataset,
        sigma,
        "imported",
        source={"path": str(path), "arch": file_arch if file_arch is not None else arch, "normalization": kind},
    )
    meta["normalization"] = {"mean": mean, "std": std}
    meta["weights"] = {"sha256": sha256_file(path)}
    return model.eval(), meta


def export_checkpoint(run: str | os.PathLike, out: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a certkit run as ``{'epoch', 'arch', 'state_dict'}`` with the reference key names.

    The reference ``certify.py`` rebuilds ``Sequential(get_normalize_layer(dataset), net)`` from the
    dataset name alone, so only models whose first layer is that dataset's standard layer are exported:
    anything else would certify a different function there. An existing ``out`` is replaced only with
    ``overwrite`` (an export does not resume: what the file held would be lost).
    """
    check_output(out, "--out")
    if not overwrite and Path(out).exists():
        raise CertkitError(f"--out {out}: exists; pass --overwrite to replace it, or choose another file")
    meta = read_meta(run)  # the architecture is checked before any weights load (your own model would not)
    arch = meta["arch"]
    if meta.get("method") == "gloro" or "gloro" in meta:
        raise CertkitError(
            f"{run}: a GloRo net is certified by its Lipschitz bound; the reference layout has no place for it"
        )
    if arch not in EXPORT_NAMES:
        raise CertkitError(
            f"{run}: the reference certify.py cannot build {arch!r}; "
            f"exportable architectures: {', '.join(sorted(EXPORT_NAMES))}"
        )
    dataset = meta.get("dataset")
    if dataset is None:
        raise CertkitError(f"{run}: model.json names no dataset, so the reference input layer is unknown")
    model, meta = load_with_meta(run)
    assert isinstance(model, nn.Sequential)  # a run of a certkit architecture: input layer, then the network
    mean, std = _first_layer("standard", dataset_info(dataset))
    have = {k: v.flatten() for k, v in model[0].state_dict().items()}
    if not (torch.equal(have["mean"], torch.tensor(mean)) and torch.equal(have["std"], torch.tensor(std))):
        raise CertkitError(
            f"{run}: its input layer (mean {have['mean'].tolist()}, std {have['std'].tolist()}) is not "
            f"the reference layer for {dataset} (mean {mean}, std {std})"
        )
    layout = _layout(arch, str(run))
    back = [(new, old) for old, new in layout.renames]
    prefix = "1.module." if layout.inner_module else "1."
    state = {prefix + _rename(k, back): v.detach().cpu().clone() for k, v in model[1].state_dict().items()}
    buf = io.BytesIO()
    torch.save({"epoch": int(meta.get("epochs_completed", 0)), "arch": EXPORT_NAMES[arch], "state_dict": state}, buf)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)


__all__ = [
    "EXPORT_NAMES",
    "NORMALIZATIONS",
    "REFERENCE_ARCHS",
    "REFERENCE_LAYOUTS",
    "ReferenceArch",
    "check_fits_dataset",
    "export_checkpoint",
    "import_checkpoint",
]


def is_reference_checkpoint(path: str | os.PathLike) -> bool:
    """A ``.pth``/``.pth.tar``/``.pt`` file: the reference code bases' checkpoints, not a certkit run."""
    return Path(path).is_file() and str(path).endswith((".pth", ".pth.tar", ".pt"))


def load_any(
    path: str | os.PathLike,
    dataset: str | None = None,
    device: torch.device | str = "cpu",
    arch: str | None = None,
    normalization: str | None = None,
    model: nn.Module | None = None,
    flags: tuple[str, str] = ("--arch", "--normalization"),
) -> tuple[nn.Module, dict[str, Any]]:
    """A certkit run directory / model.json (``model``: see :func:`certkit.checkpoint.load_with_meta`), or a
    reference ``.pth``/``.pth.tar`` (needs ``dataset``).

    ``arch`` and ``normalization`` describe a reference file; a certkit run records both, so giving
    them for one is refused rather than ignored. ``flags`` name them in messages (:func:`import_checkpoint`).
    """
    if is_reference_checkpoint(path):
        if dataset is None:
            raise CertkitError(f"{path}: a reference checkpoint needs --dataset to know its normalization")
        imported, meta = import_checkpoint(path, dataset, arch=arch, normalization=normalization, flags=flags)
        return imported.to(device), meta
    if arch is not None or normalization is not None:
        raise CertkitError(
            f"{path}: {flags[0]} and {flags[1]} describe reference .pth/.pth.tar files; a certkit run records both"
        )
    return load_with_meta(path, device, model)
