"""The cyclic garbage collector, paused while the worker starts and settled once after.

Start-up imports a few thousand modules and loads the model: over half a million objects that
live as long as the worker, and almost no garbage. With the collector on, every few hundred new
objects trigger a collection, and the older generations, which hold everything made so far, are
scanned again and again as they grow: about a second of CPU in a five-second cold start of the
tiny model on two cores. So the collector is paused from the first line; what the imports made
(modules, classes, functions) is frozen, never scanned again, with the few cycles they dropped
(on the tiny model: 9 thousand objects, 7 MB, no tensor), which would cost 0.3 s to find among
half a million; and once the worker is loaded, one collection frees whatever loading left in
cycles (an exception's frames holding a host buffer, say) before the survivors are frozen too.
The collections that requests trigger then scan only what requests make, never the model.
A frozen object dropped in a cycle later (a runner replaced after a fault, say) is freed only
by a collection that unfreezes first: the worker runs one after a failed request.
"""

from __future__ import annotations

import gc


def pause_collector() -> None:
    """Called first thing in the process, before the heavy imports."""
    gc.disable()


def freeze_imports() -> None:
    """Called once the imports are done, before the worker loads anything."""
    gc.freeze()


def settle_collector() -> None:
    """Called once the worker is loaded: one collection, the survivors frozen, the collector back on."""
    gc.collect()
    gc.freeze()
    gc.enable()


def collect_everything() -> None:
    """A collection that sees the frozen objects too, then freezes the survivors again: after a fault,
    whatever start-up made and the fault dropped in a cycle is freed with the rest."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
