"""The RunPod SDK's import, run in the background while the worker loads.

At import, the SDK's debugger module asks py-cpuinfo for the processor's name
(``cpuinfo.get_cpu_info()["brand_raw"]``), and py-cpuinfo gathers everything it can in a
second Python process, which starts a third to read CPUID and spins while it waits: about a
second of CPU at every cold start, on the cores the worker is loading its model on. During
the SDK's import, the name comes from the kernel's ``/proc/cpuinfo`` instead (its ``model
name`` is the same CPUID brand string); where the kernel does not say, py-cpuinfo answers as
before, and after the import it answers every caller as before.

Nothing here imports torch, so ``handler.py`` starts the thread before its own imports.
"""

from __future__ import annotations

import importlib
import re
import threading
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def processor_name(cpuinfo: Path = CPUINFO) -> str | None:
    """The processor's brand string as the kernel reports it, or None where it does not."""
    try:
        match = re.search(r"^model name\s*:\s*(.+?)\s*$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def import_runpod() -> None:
    """Imports the SDK, its debugger told the processor's name without py-cpuinfo's processes."""
    name = processor_name()
    try:
        import cpuinfo
    except ImportError:  # an SDK that no longer asks py-cpuinfo
        name = None
    if name is None:
        importlib.import_module("runpod")
        return
    asked = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": name}
    try:
        importlib.import_module("runpod")
    finally:
        cpuinfo.get_cpu_info = asked


def start_import() -> threading.Thread:
    """The SDK's import, started; join the thread, then ``import runpod`` binds it (or raises its error)."""
    thread = threading.Thread(target=import_runpod, name="runpod-import", daemon=True)
    thread.start()
    return thread
