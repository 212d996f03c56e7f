"""Checkpoints: ``model.safetensors`` + ``model.json``, and nothing is ever unpickled.

A run directory holds

* ``model.safetensors`` — the weights (safetensors cannot carry code);
* ``model.json`` — everything needed to rebuild the model and to know what it is: architecture, dataset,
  number of classes, input shape, normalization, sigma, method and its resolved hyperparameters, epochs,
  the cost ledger, the teacher lineage (CRT), the certkit version, and the SHA-256 and tensor specs of the
  weights file.

:func:`load` rebuilds the model from those two files alone and refuses (with a message naming the file) a
weights file whose hash, tensor names, shapes or dtypes do not match its metadata, or that is truncated.

Foreign checkpoints of the field's reference code bases (``.pth``/``.pth.tar`` dicts with ``arch`` and
``state_dict``) are read only through ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers and refuses every other pickled object.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from certkit import __version__
from certkit.data import dataset_info
from certkit.errors import CertkitError, first_line
from certkit.fileio import atomic_write_bytes, atomic_write_json, read_json, require_regular, sha256_file
from certkit.models import create_model, wrapper

FORMAT = "certkit-checkpoint/1"
WEIGHTS = "model.safetensors"
META = "model.json"
#: the resume state a training run keeps beside its checkpoint (:mod:`certkit.train`)
RESUME_STATE = "train_state.safetensors"


def _resume_hint(folder: Path) -> str:
    """Where a run's training state survives an interrupted save (the weights and model.json are replaced
    one after the other), how to republish the pair."""
    if (folder / RESUME_STATE).is_file():
        return "; its training state is there: run the same `certkit train` with --resume to republish both files"
    return ""


def run_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) paths for a run directory, a ``model.json`` or a ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        return p / WEIGHTS, p / META
    if p.suffix == ".json":
        return p.with_name(WEIGHTS) if p.name == META else p.with_suffix(".safetensors"), p
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    raise CertkitError(f"{p}: not a certkit run directory, model.json or model.safetensors")


def tensor_specs(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()}


def environment() -> dict[str, str]:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"certkit": __version__, "torch": torch.__version__, "python": platform.python_version(), "device": dev}


def state_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The tensors as a safetensors file; one that shares memory with a tensor already taken is copied.

    Tied weights (one parameter under two names) share memory, which safetensors refuses to write; the copy
    stores the same values under both names, and loading puts them into the one parameter the module ties.
    """
    seen: set[int] = set()
    tensors = {}
    for name, value in state.items():
        t = value.detach().contiguous().cpu()
        storage = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return st_save(tensors, metadata=metadata)


def save(model: nn.Module, run_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write weights then metadata, each atomically; the metadata records the weights' hash.

    ``meta`` must hold at least ``arch``, ``dataset``/``num_classes``/``in_shape`` (or a ``dataset`` known to
    certkit) and the normalization; :func:`make_meta` builds it.
    """
    run_dir = Path(run_dir)
    model = getattr(model, "module", model)
    state = model.state_dict()
    weights, meta_path = run_dir / WEIGHTS, run_dir / META
    atomic_write_bytes(weights, state_to_bytes(state))
    full = dict(meta)
    full.update(
        format=FORMAT,
        weights={"file": WEIGHTS, "sha256": sha256_file(weights), "tensors": tensor_specs(state)},
    )
    full.setdefault("environment", environment())
    atomic_write_json(meta_path, full)
    return run_dir


def make_meta(
    arch: str,
    dataset: str,
    sigma: float | None,
    method: str,
    hparams: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata for a model of a registered architecture on a known dataset."""
    info = dataset_info(dataset)
    meta: dict[str, Any] = {
        "arch": arch,
        "dataset": dataset,
        "num_classes": info.num_classes,
        "in_shape": list(info.in_shape),
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "sigma": sigma,
        "method": method,
        "hparams": dict(hparams or {}),
        "certkit_version": __version__,
    }
    meta.update(extra)
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    _, meta_path = run_paths(path)
    if not meta_path.exists():
        raise CertkitError(
            f"{meta_path}: missing; a certkit checkpoint needs {META} beside {WEIGHTS}{_resume_hint(meta_path.parent)}"
        )
    meta = read_json(meta_path, "checkpoint metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CertkitError(f"{meta_path}: not a certkit checkpoint (expected format {FORMAT!r})")
    problem = meta_problem(meta)
    if problem:
        raise CertkitError(f"{meta_path}: {problem}")
    return meta


#: bounds on what a model.json may ask certkit to build: ImageNet-21k has 21,841 classes and 224x224
#: colour images, hyperspectral images a few hundred bands; beyond these a crafted file would only ask the
#: allocator for gigabytes (an image of MAX_VALUES float32 values is 256 MiB)
MAX_CLASSES = 100_000
MAX_CHANNELS = 1024
MAX_SIDE = 4096
MAX_VALUES = 1 << 26


def shape_problem(shape: Any) -> str | None:
    """What keeps ``shape`` from being a model.json's ``in_shape`` (None: nothing).

    The trainer asks this of the first training image before any work, so that it never writes a run that
    loading would refuse.
    """
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_int(v) and v >= 1 for v in shape)):
        return f"the image shape must be (channels, height, width) of positive integers (got {shape!r})"
    if shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIDE or math.prod(shape) > MAX_VALUES:
        return (
            f"image shape {tuple(shape)} is beyond certkit's bounds ({MAX_CHANNELS} channels, sides of "
            f"{MAX_SIDE}, {MAX_VALUES:,} values)"
        )
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a ``model.json``'s fields (None: nothing), checked before any of them is used to
    build a model: types, bounds that keep a crafted file from asking for terabytes, and the weights' hash,
    which must be there (a checkpoint without one would load unchecked)."""
    for key in ("arch", "num_classes", "in_shape", "weights"):
        if key not in meta:
            return f"missing field {key!r}"
    if not isinstance(meta["arch"], str):
        return "'arch' must be a string"
    # a list or mapping here would reach the registries' dict lookups as an unhashable key
    for key in ("dataset", "method", "wrapper"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"{key!r} must be a string (got {meta[key]!r})"
    if not (_is_int(meta["num_classes"]) and 1 <= meta["num_classes"] <= MAX_CLASSES):
        return f"'num_classes' must be an integer in 1..{MAX_CLASSES:,} (got {meta['num_classes']!r})"
    shape = meta["in_shape"]
    problem = shape_problem(shape) if isinstance(shape, list) else "must be a list"
    if problem:
        return f"'in_shape': {problem}"
    sigma = meta.get("sigma")
    if sigma is not None and not (_is_number(sigma) and sigma > 0):
        return f"'sigma' must be a positive finite number (got {sigma!r})"
    norm = meta.get("normalization")
    if norm is not None:
        if not (
            isinstance(norm, dict)
            and all(
                isinstance(norm.get(k), list) and len(norm[k]) == shape[0] and all(_is_number(v) for v in norm[k])
                for k in ("mean", "std")
            )
        ):
            return f"'normalization' must hold 'mean' and 'std', {shape[0]} finite numbers each"
        if not all(v > 0 for v in norm["std"]):
            return f"'normalization' std must be positive (got {norm['std']!r})"
    weights = meta["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("tensors"), dict):
        return "'weights' must be a mapping with the weights file's 'sha256' and 'tensors'"
    digest = weights.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        return (
            f"'weights' has no valid 'sha256' of {WEIGHTS}, so the weights cannot be checked; restore the file, "
            "or re-save the run (certkit train ... --resume rewrites it)"
        )
    for key in ("hparams", "train"):
        if key in meta and not isinstance(meta[key], dict):
            return f"{key!r} must be a mapping"
    return None


def wrapper_key(meta: dict[str, Any]) -> str | None:
    """The registered wrapper ``meta`` declares; files written before the key existed name GloRo implicitly."""
    if "wrapper" in meta:
        return meta["wrapper"]
    return "gloro" if meta.get("method") == "gloro" or "gloro" in meta else None


def build_model(meta: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """An untrained model as ``meta`` describes it: ``model`` (your own module) or the registered
    architecture, inside the wrapper ``meta`` declares (if any)."""
    if model is None:
        norm = meta.get("normalization")
        if not isinstance(norm, dict):
            raise CertkitError(
                f"model.json: architecture {meta['arch']!r} is not one of certkit's; "
                "load the run with certkit.load(run, model=<an untrained instance of your module>)"
            )
        model = create_model(meta["arch"], meta["num_classes"], meta["in_shape"], norm["mean"], norm["std"])
    key = wrapper_key(meta)
    return wrapper(key)(model, meta) if key is not None else model


def read_weights(weights: Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its hash and tensor specs against ``meta`` when given."""
    if not weights.exists():
        raise CertkitError(f"{weights}: missing")
    require_regular(weights, "weights file")
    if meta is not None and sha256_file(weights) != meta["weights"]["sha256"]:  # read_meta made sure there is one
        raise CertkitError(
            f"{weights}: SHA-256 does not match {META} (modified, truncated or interrupted write)"
            + _resume_hint(weights.parent)
        )
    try:
        state = st_load(weights.read_bytes())
    except OSError as e:
        raise CertkitError(f"{weights}: cannot read it ({e.strerror or e})") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CertkitError(f"{weights}: not a valid safetensors file ({e})") from None
    if meta is not None and tensor_specs(state) != meta["weights"].get("tensors"):
        raise CertkitError(f"{weights}: tensor names, shapes or dtypes do not match {META}")
    return state


def load_with_meta(
    path: str | os.PathLike, device: torch.device | str = "cpu", model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a certkit model from its two files; returns (model in eval mode, metadata).

    ``model``: an untrained instance of the module the run trained (required for your own modules); its
    weights are replaced by the saved ones, which must match it name for name and shape for shape.
    """
    weights, _ = run_paths(path)
    meta = read_meta(path)
    state = read_weights(weights, meta)  # as large as the file, which holds them
    if model is None:
        # certkit builds the architecture model.json names, first on the meta device, which allocates
        # nothing: a crafted model.json (100,000 classes at 1024x1024) beside a tiny weights file would
        # otherwise have it allocate gigabytes before any check could refuse it. A module of the user's own
        # is built already (lazy layers and another float dtype included) and load_state_dict checks it.
        with torch.device("meta"):
            skeleton = build_model(meta)
        misfit = _misfit(tensor_specs(skeleton.state_dict()), tensor_specs(state))
        if misfit:
            raise CertkitError(f"{weights}: weights do not fit architecture {meta['arch']!r} ({misfit})")
    model = build_model(meta, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        misfit = _misfit(tensor_specs(model.state_dict()), tensor_specs(state), dtype=False)
        raise CertkitError(
            f"{weights}: weights do not fit architecture {meta['arch']!r} ({misfit or first_line(e)})"
        ) from None
    return model.to(device).eval(), meta


def _misfit(want: dict[str, dict[str, Any]], have: dict[str, dict[str, Any]], dtype: bool = True) -> str | None:
    """The first way the file's tensors (``have``) differ from those the model takes (``want``): a missing or
    unexpected name, another shape or (with ``dtype``; a module of your own converts on loading) dtype."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        return f"missing {', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}"
    for name, spec in want.items():
        got = have[name]
        if got["shape"] != spec["shape"] or (dtype and got != spec):
            return f"{name}: the file has {got['dtype']} {got['shape']}, it takes {spec['dtype']} {spec['shape']}"
    return None


def load(path: str | os.PathLike, device: torch.device | str = "cpu", model: nn.Module | None = None) -> nn.Module:
    """``certkit.load(run_dir)``: the model, in eval mode, rebuilt from ``model.json`` + ``model.safetensors``.

    A run of your own module loads into an untrained instance of it: ``certkit.load(run, model=MyNet())``.
    """
    return load_with_meta(path, device, model)[0]


def model_hash(path: str | os.PathLike) -> str:
    """The SHA-256 of a checkpoint's weights file (or of a foreign checkpoint file)."""
    p = Path(path)
    return sha256_file(run_paths(p)[0] if p.is_dir() or p.suffix in (".json", ".safetensors") else p)
