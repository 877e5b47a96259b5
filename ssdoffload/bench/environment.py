"""What the benchmark ran on: versions, the compute device, and the disk under each spill path."""
from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Dict, List, Optional

import torch


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> Optional[int]:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def _mount_of(path: str) -> Dict[str, str]:
    """The /proc/mounts entry (device, mount point, filesystem type) holding ``path``."""
    path = os.path.realpath(path)
    best = {"device": "?", "mount": "/", "fstype": "?"}
    text = _read("/proc/mounts") or ""
    best_len = -1
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        dev, mnt, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best_len:
            best, best_len = {"device": dev, "mount": mnt, "fstype": fstype}, len(mnt)
    return best


def _block_device_info(device: str) -> Dict[str, object]:
    """Model and rotational flag of the block device behind ``device`` (e.g. /dev/nvme0n1p1)."""
    name = os.path.basename(os.path.realpath(device)) if device.startswith("/dev/") else ""
    if not name:
        return {}
    sys_dir = f"/sys/class/block/{name}"
    if not os.path.exists(sys_dir):
        return {"name": name}
    parent = os.path.basename(os.path.dirname(os.path.realpath(sys_dir)))
    disk = parent if os.path.exists(f"/sys/block/{parent}") else name
    info: Dict[str, object] = {"name": name, "disk": disk}
    model = _read(f"/sys/block/{disk}/device/model")
    if model:
        info["model"] = model
    rot = _read(f"/sys/block/{disk}/queue/rotational")
    if rot is not None:
        info["rotational"] = rot == "1"
    return info


def disk_info(path: str) -> Dict[str, object]:
    """Filesystem and device facts of the spill directory ``path`` (or its nearest parent)."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or "/"
    mount = _mount_of(probe)
    info: Dict[str, object] = {"path": path, **mount}
    try:
        usage = shutil.disk_usage(probe)
        info["free_bytes"] = usage.free
        info["total_bytes"] = usage.total
    except OSError:
        pass
    info.update({f"block_{k}": v for k, v in _block_device_info(mount["device"]).items()})
    return info


def environment(device: torch.device, spill_paths: List[str]) -> Dict[str, object]:
    """Versions, host, compute device and spill disks, for the JSON report."""
    from .. import __version__

    env: Dict[str, object] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ssdoffload": __version__,
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host_memory_bytes": _memory_bytes(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "cuda": torch.version.cuda,
        "spill_disks": [disk_info(p) for p in spill_paths],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                   cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
        try:
            import kvikio  # noqa: F401
            env["kvikio"] = _version("kvikio")
        except Exception:
            env["kvikio"] = None
    return env


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None
