"""perf.coldstart times the worker with its modules compiled, as the image has them."""

from __future__ import annotations

import sys

import pytest

from perf.coldstart import compile_bytecode


def test_the_workers_modules_are_compiled_even_where_python_caches_no_bytecode(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (tmp_path / "engine" / "serving").mkdir(parents=True)
    (tmp_path / "engine" / "serving" / "worker.py").write_text("VALUE = 1\n")
    compile_bytecode(tmp_path)
    assert list((tmp_path / "engine" / "serving" / "__pycache__").glob("worker.*.pyc"))


def test_a_module_that_does_not_compile_stops_the_measurement(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "broken.py").write_text("def (:\n")
    with pytest.raises(RuntimeError, match="do not compile"):
        compile_bytecode(tmp_path)
