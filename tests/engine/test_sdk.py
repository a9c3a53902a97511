"""The RunPod SDK's import: no py-cpuinfo processes, the same processor name for its debugger."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.serving.sdk import CPUINFO, processor_name
from tests.conftest import ROOT

IMPORT_AND_REPORT = """
import json, subprocess
started = []
spawn = subprocess.Popen.__init__
def recording(self, args, *rest, **options):
    started.append([str(arg) for arg in args] if isinstance(args, (list, tuple)) else [str(args)])
    spawn(self, args, *rest, **options)
subprocess.Popen.__init__ = recording
import cpuinfo
asked = cpuinfo.get_cpu_info
from engine.serving.sdk import import_runpod
import_runpod()
from runpod.serverless.utils import rp_debugger
print(json.dumps({"processes": started, "processor": rp_debugger.PROCESSOR, "restored": cpuinfo.get_cpu_info is asked}))
"""


def test_the_processor_name_is_the_kernels_model_name(tmp_path):
    listing = tmp_path / "cpuinfo"
    listing.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor  \n")
    assert processor_name(listing) == "AMD EPYC 7763 64-Core Processor"
    listing.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")
    assert processor_name(listing) is None
    assert processor_name(tmp_path / "missing") is None


@pytest.mark.skipif(processor_name() is None, reason=f"{CPUINFO} names no processor here")
def test_the_sdk_imports_without_py_cpuinfos_processes_and_names_the_processor():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_REPORT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout.splitlines()[-1])
    assert [args for args in report["processes"] if any("cpuinfo" in arg for arg in args)] == []
    assert report["processor"] == processor_name()
    assert report["restored"]
