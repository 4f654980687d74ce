"""Which torch device to run on: a device name checked against this torch build and the visible GPUs, so that a
wrong `--device` fails at once with one line saying what to do instead of deep inside model loading."""
from __future__ import annotations

import os

import torch


class DeviceError(ValueError):
    """The requested device does not exist here (a bad name, no CUDA in this torch build, no such GPU)."""


def _has_cuda_build() -> bool:
    """Whether this torch build can use CUDA devices at all (ROCm builds expose AMD GPUs as 'cuda' too)."""
    return bool(torch.backends.cuda.is_built() or getattr(torch.version, "hip", None))


def resolve_device(name: str | torch.device | None, option: str = "device") -> torch.device:
    """The torch.device for `name` ("cpu", "cuda", "cuda:1", a torch.device), or when `name` is None (or "")
    CUDA if available, else the CPU.

    Raises DeviceError (a ValueError) with one line naming `option` (e.g. "--device" in the CLI, "device" in
    the Python API) and the fix, for: a string that names no device; a CUDA device when this torch build has no
    CUDA support or no GPU is visible; a CUDA index past the visible devices; a device type the engine does
    not run on (it runs on cpu and cuda).
    """
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = str(name).strip()
    # `--device cpu` in the CLI; `device='cpu'` in Python.
    use_cpu = f"{option} cpu" if option.startswith("-") else f"{option}='cpu'"
    try:
        device = name if isinstance(name, torch.device) else torch.device(given)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{option} {given}: not a device name; use cpu, cuda or cuda:N (N: a GPU index)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"{option} {given}: not supported; the engine runs on cpu, cuda or cuda:N")
    if not _has_cuda_build():
        raise DeviceError(f"{option} {given}: this torch build ({torch.__version__}) has no CUDA support; use "
                          f"{use_cpu} or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise DeviceError(f"{option} {given}: no CUDA device is visible to torch {torch.__version__} (check the "
                          f"NVIDIA driver, nvidia-smi and CUDA_VISIBLE_DEVICES); use {use_cpu}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        env = "CUDA_VISIBLE_DEVICES is unset" if env is None else f"CUDA_VISIBLE_DEVICES={env!r}"
        raise DeviceError(f"{option} {given}: only {count} CUDA device{'s' if count != 1 else ''} "
                          f"{'are' if count != 1 else 'is'} visible ({visible}; {env})")
    return device
