"""The one place a user's `device` argument is resolved and checked."""
import torch


def resolve_device(device=None) -> torch.device:
    """`device` as a torch.device (None: CUDA when available, else the CPU). ValueError for a
    malformed name, or a CUDA device this torch build or machine does not have, instead of an
    assertion deep inside the first tensor copy."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: {str(error).splitlines()[0]}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} ({build}) sees no CUDA "
                             "GPU; use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are "
                             "visible")
    return resolved
