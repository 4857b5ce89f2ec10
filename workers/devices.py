"""Where the models run: one rule for the scorer, the detector and the matting network."""

from __future__ import annotations

import torch


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1"), or CUDA when this process sees a GPU.

    Ray actors ask for the device Ray granted them (``cluster.runtime.actors.granted_device``): Ray
    leaves an actor given no GPU seeing every GPU of its node.
    """
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= visible:
            raise ValueError(f"device {requested!r}: this process sees {visible} CUDA device(s)")
    return device
