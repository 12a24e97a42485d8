"""What a result or checkpoint was made with: code revision, library versions, device, dtype and thread count.

Recorded beside every evaluation and every training attempt because CPU kernels reduce in thread-count-dependent
order: a run reproduces bit for bit only on as many threads as it first ran with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers


def code_revision() -> str | None:
    """The git commit of the minillm checkout, with '+dirty' for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "code_revision": code_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
