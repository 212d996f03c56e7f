"""Reduced-precision autocast (``--amp``) for training and for the certifier's forward passes.

Autocast is a speed option only where the hardware multiplies in the lower precision natively: CUDA tensor
cores, and CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX), on which oneDNN runs bf16
convolutions and matrix products. Elsewhere torch emulates bf16 on the CPU, which is slower than fp32 and
would change the classifier for nothing, so it is refused with a one-line error instead.
"""

from __future__ import annotations

import torch

from certkit.errors import CertkitError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX tiles) torch can use."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: None for off; bf16 or fp16 on CUDA; bf16 on a CPU with
    native bf16 instructions. Anything else is an error the user must fix."""
    if amp is None or amp == "off":
        return None
    if amp not in AMP_DTYPES:
        raise CertkitError(f"--amp must be off, {' or '.join(AMP_DTYPES)} (got {amp!r})")
    if device.type == "cuda":
        return AMP_DTYPES[amp]
    if device.type == "cpu" and amp == "bf16":
        if cpu_has_native_bf16():
            return torch.bfloat16
        raise CertkitError(
            "--amp bf16 on CPU needs bfloat16 instructions (AVX512-BF16 or AMX), which this CPU lacks "
            "(emulated bf16 is slower than fp32); use --amp off"
        )
    raise CertkitError(f"--amp {amp} runs on CUDA (and bf16 on CPUs with AVX512-BF16 or AMX), not on {device.type}")
