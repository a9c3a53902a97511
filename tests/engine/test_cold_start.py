"""The cold start's own machinery: the paused garbage collector and the clock its phases start from."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest

from engine.common.metrics import ColdStart
from engine.serving.heap import collect_everything, freeze_imports, pause_collector, settle_collector
from engine.serving.startup import start
from tests.conftest import use_settings_env


class Node:
    """An object that can sit in a reference cycle and be watched through a weak reference."""

    partner: Node | None = None


@pytest.fixture
def collector_restored():
    yield
    gc.unfreeze()
    gc.enable()


def tracked(obj: object) -> bool:
    """Whether the collector's generations (not its frozen objects) hold ``obj``."""
    return any(candidate is obj for candidate in gc.get_objects())


def test_the_collector_pauses_for_start_up_and_frees_what_loading_dropped(collector_restored):
    pause_collector()
    assert not gc.isenabled()
    imported = Node()
    freeze_imports()
    assert not tracked(imported), "what the imports made is frozen"
    survivor = Node()
    garbage = Node()
    garbage.partner = Node()
    garbage.partner.partner = garbage
    dropped = weakref.ref(garbage)
    del garbage
    assert dropped() is not None, "a paused collector frees no cycle"
    settle_collector()
    assert dropped() is None, "the cycle loading dropped is freed, not frozen"
    assert gc.isenabled()
    assert not tracked(survivor), "what loading kept is frozen too"


def test_after_a_fault_a_frozen_object_dropped_in_a_cycle_is_freed(collector_restored):
    runner = Node()
    runner.partner = Node()
    runner.partner.partner = runner
    settle_collector()
    assert not tracked(runner), "start-up's objects are frozen"
    replaced = weakref.ref(runner)
    del runner
    gc.collect()
    assert replaced() is not None, "an ordinary collection does not see a frozen cycle"
    collect_everything()
    assert replaced() is None
    survivor = Node()
    collect_everything()
    assert not tracked(survivor), "what survives is frozen again"


@pytest.mark.parametrize("model", ["tiny", "/nonexistent/model"], ids=["started", "failed"])
def test_start_up_turns_the_collector_back_on_whether_or_not_the_worker_started(
    monkeypatch, make_settings, collector_restored, model
):
    use_settings_env(monkeypatch, make_settings(model=model))
    pause_collector()
    cold_start = ColdStart()
    startup = start(cold_start)
    assert (startup.worker is None) == (model != "tiny")
    assert gc.isenabled() and gc.get_freeze_count() > 0
    assert "settle_heap" in cold_start.phases_ms


def test_the_cold_start_clock_starts_when_the_process_does():
    """psutil's start time rests on a boot time in whole seconds; the cold start's must be a tick away."""
    script = (
        "import time; entered = time.time()\n"
        "from engine.common.metrics import process_start_time\n"
        "print(entered - process_start_time())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before_first_line = float(done.stdout)
    assert 0.0 <= before_first_line < 0.3, f"the process started {before_first_line:.3f} s before its first line"
