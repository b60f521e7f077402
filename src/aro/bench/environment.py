"""What a measurement ran on: git revision, torch, Python, the CPU and its bfloat16 instructions.

Every result file records it, because machines differ between sessions (bfloat16 products are
native on some CPUs and emulated on others) and times are only comparable within one machine.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..tuning import native_bf16

__all__ = ["environment_info"]


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_info() -> dict[str, Any]:
    """Name, family/model and the instruction sets that decide bfloat16 matmul speed, from the
    first processor of ``/proc/cpuinfo`` (Linux; elsewhere the name from ``platform``)."""
    info: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                info["name"] = value
            elif key in ("cpu family", "model"):
                info[key.replace(" ", "_")] = value
            elif key == "flags":
                flags = set(value.split())
                info["bf16_instructions"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
                info["avx512"] = "avx512f" in flags
            elif not line.strip() and info:
                break  # the end of the first processor's block
    except OSError:
        pass
    info.setdefault("name", platform.processor() or platform.machine())
    return info


def environment_info() -> dict[str, Any]:
    cpu = _cpu_info()
    return {
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu.pop("name"),
        "cpu_details": cpu,
        "threads": torch.get_num_threads(),
        "bf16_native": native_bf16(torch.device("cpu")),  # whether bfloat16 products run at full speed here
        "platform": platform.platform(),
    }
