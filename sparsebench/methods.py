"""The shape of a method class, and a convenience base class for writing one.

A method is any class with ``name: str``, a pydantic ``Config`` model (defaults for every field),
``__init__(self, config)`` and hook implementations decorated with ``@hookimpl``. Subclassing
:class:`Method` is optional; it only supplies the defaults below.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

from sparsebench.errors import PluginError


class NoOptions(BaseModel):
    """Config of a method without options."""

    model_config = ConfigDict(extra="forbid")


class Method:
    #: the key used in suites
    name: ClassVar[str] = ""
    #: pydantic model of the method's options, with defaults
    Config: ClassVar[type[BaseModel]] = NoOptions
    #: True if update_mask may change the number of active weights (pruning methods)
    changes_density: ClassVar[bool] = False
    #: True if the method keeps the dense values of pruned weights (straight-through methods such
    #: as SR-STE): the harness then neither zeroes pruned weights nor masks their gradients nor
    #: resets their optimizer state at mask changes, and zeroes them once, after the last
    #: optimizer step. The method must apply its masks in the forward pass itself.
    keeps_dense_weights: ClassVar[bool] = False
    #: observers (loggers, progress bars) are not counted in the method's overhead
    observer: ClassVar[bool] = False
    #: a module or class of extra hookspecs this method defines (``pm.add_hookspecs``)
    hookspecs: ClassVar[Optional[Any]] = None

    def __init__(self, config: Optional[BaseModel] = None):
        self.config = config if config is not None else type(self).Config()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly.

        Checkpoints load with ``torch.load(weights_only=True)``: use tensors, numbers, strings,
        bools, None, lists, tuples and dicts only (no numpy arrays, no objects). Tensors come
        back on the device they were saved from.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_method_class(cls: Any, package: str) -> None:
    """Refuse a class that does not have the documented shape, naming the package."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{package}: method class {cls!r} has no string attribute 'name'")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"{package}: method '{name}' needs a pydantic 'Config' model (class Config(BaseModel))")
    try:
        config()
    except Exception as exc:  # a Config without defaults cannot be used with no overrides
        raise PluginError(f"{package}: method '{name}': Config() must be valid with defaults only ({exc})") from exc
