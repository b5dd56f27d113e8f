"""Which device a command runs its model on: `--device auto|cpu|cuda|cuda:N`, decided once."""

from __future__ import annotations

import torch

from .errors import EffftError


class DeviceError(EffftError):
    """A device this machine does not have, or a precision the device does not offer."""

    exit_code = 2


def pick_device(text: str, *, flag: str = "--device") -> torch.device:
    """The device `text` names: auto is the first CUDA GPU where PyTorch sees one, else the CPU.
    A CUDA device that is not there is a DeviceError naming `flag`."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"{flag} {text}: PyTorch sees no CUDA GPU on this machine; use {flag} cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{flag} {text}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 runs the model under autocast on a GPU; on a CPU it is refused (most CPUs compute it
    no faster than fp32, and its probabilities would differ from the run's own)."""
    if precision == "bf16" and device.type != "cuda":
        raise DeviceError(f"--precision bf16 needs a CUDA GPU (--device cuda), and the model runs on {device}: "
                          "use --precision fp32 there")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any, e.g. ONNX Runtime's)."""
    weight = next(model.parameters(), None)
    return torch.device("cpu") if weight is None else weight.device
