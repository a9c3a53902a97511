"""ControlNets a request names: folders in CONTROLNET_DIR, checked against the model.

A name becomes a component of the model (``controlnet.<name>``) the first time a request
admitted uses it, once its config shows that its residuals fit the model's UNet; from then on it
is served like any component, through its own runner chain.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from engine.common.errors import RequestError
from engine.common.names import check_name
from engine.models.controlnet import CONTROLNET_PREFIX, controlnet_component
from engine.models.model import WEIGHT_SUFFIXES, Model

log = logging.getLogger(__name__)


def found_controlnets(root: Path) -> list[str]:
    """The ControlNet folders in ``root``: each holds a config.json."""
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if (path / "config.json").is_file())


class ControlNetFolders:
    """The ControlNets in CONTROLNET_DIR, each checked against the model once and added to it."""

    def __init__(self, root: Path, model: Model):
        self.root = root
        self.model = model
        self._lock = threading.Lock()

    def component(self, name: str, field: str) -> str:
        """``check``, then ``add``: ControlNet ``name`` made one of the model's components."""
        component = self.check(name, field)
        self.add(component)
        return component

    def check(self, name: str, field: str) -> str:
        """The model's component for ControlNet ``name``, once its folder is found and fits the model's
        UNet; a RequestError under ``field`` otherwise. The model is left as it was: a request refused
        for another reason adds nothing."""
        family = self.model.family
        if not family.controlnets:
            raise RequestError(f"{field}: ControlNets are not supported for {family.name} models yet")
        check_name(name, field)
        if any(separator in name for separator in "/\\"):
            raise RequestError(f"{field}: must be the name of a folder in CONTROLNET_DIR, got {name!r}")
        component = controlnet_component(name)
        if component in self.model.controlnets:
            return component
        folder = self.root / name
        if not (folder / "config.json").is_file():
            log.info("%s: no ControlNet %r under %s", field, name, self.root)
            raise RequestError(f"{field}: no ControlNet {name!r} in CONTROLNET_DIR")
        if not any(path.suffix in WEIGHT_SUFFIXES for path in folder.iterdir()):
            raise RequestError(f"{field}: ControlNet {name!r} has a config.json but no weights")
        problems = self.model.controlnet_mismatches(folder)
        if problems:
            raise RequestError(
                f"{field}: ControlNet {name!r} was made for another model than this "
                f"{family.name} one: {'; '.join(problems)}"
            )
        return component

    def add(self, component: str) -> None:
        """Makes a ControlNet ``check`` accepted one of the model's components, once."""
        with self._lock:
            if component not in self.model.controlnets:
                name = component.removeprefix(CONTROLNET_PREFIX)
                self.model.add_controlnet(name, self.root / name)
