"""The method contract, declared in one place: :class:`Method`.

A method is any class with ``name: str``, a pydantic ``Config`` model (defaults for every field),
``__init__(self, config)`` and hook implementations decorated with ``@hookimpl``. Subclassing
:class:`Method` is optional (the harness reads every other attribute with a default), but
:class:`Method` is where every attribute the harness reads on a method class or instance is
declared and documented, with the default a class that does not define it gets. A test keeps
the harness from reading an attribute that is not declared here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

from sparsebench.errors import PluginError


class NoOptions(BaseModel):
    """Config of a method without options."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """Base class of a sparse-training method (or of any plugin on a run's manager).

    The harness makes one instance per run, ``cls(cls.Config(**options))``, and registers it on
    that run's plugin manager under ``name``; hooks may keep state on ``self`` freely. Every
    ``@hookimpl`` must name a hook specification (the core ones, or one in a ``hookspecs`` of
    this or another registered method): a method with an unknown hook (``init_masks``) is
    marked BROKEN by ``sparsebench methods`` and every suite that uses it is refused.
    """

    #: The key used in suites (``methods: [my_method]``) and the plugin's name on the run's
    #: manager. Required; unique over every installed package.
    name: ClassVar[str] = ""
    #: Pydantic model of the method's options. Every field needs a default and a
    #: ``Field(description=...)``; use ``model_config = ConfigDict(extra="forbid")`` so a
    #: misspelled option is refused with the allowed ones listed.
    Config: ClassVar[type[BaseModel]] = NoOptions
    #: True if ``update_mask`` may change the number of active weights of a layer (pruning
    #: methods: magnitude, GMP; methods that move weights between layers: SparsAE). Otherwise
    #: the harness refuses a change that alters any layer's active count. Also lets a method
    #: start dense (``init_mask`` returning ``None``) and reach the target later.
    changes_density: ClassVar[bool] = False
    #: True if the method keeps the dense values of pruned weights (straight-through methods such
    #: as SR-STE): the harness then neither zeroes pruned weights nor masks their gradients nor
    #: resets their optimizer state at mask changes, and zeroes them once, after the last
    #: optimizer step. The method must apply its masks in the forward pass itself.
    keeps_dense_weights: ClassVar[bool] = False
    #: the number of held-out batches (``run.heldout``) the method scores masks on; a suite that
    #: cannot provide them (``data.heldout_fraction: 0``, too little data) is refused by
    #: ``validate`` naming the key to change, instead of failing at the first mask update
    min_heldout_batches: ClassVar[int] = 0
    #: packages the method imports that sparsebench does not install: import name → how to install
    #: it (``{"wandb": "pip install sparsebench[wandb]"}``); a suite naming the method without them
    #: is refused by ``validate`` in one line
    requires: ClassVar[dict[str, str]] = {}
    #: True if the method trains at its own density whatever the suite's ``sparsity`` (dense
    #: training): its runs are recorded at sparsity 0 and the conformance kit skips the
    #: target-density checks.
    ignores_sparsity: ClassVar[bool] = False
    #: True for plugins that only watch (loggers, progress displays): their hook time is not
    #: counted in the run's ``method_time_s`` / ``overhead_frac``.
    observer: ClassVar[bool] = False
    #: A module or class of extra hook specifications this method defines; the harness adds it
    #: to the run's manager (``pm.add_hookspecs``) before registering the method.
    hookspecs: ClassVar[Optional[Any]] = None

    def __init__(self, config: Optional[BaseModel] = None):
        #: the validated options (an instance of ``Config``)
        self.config = config if config is not None else type(self).Config()

    def components(self) -> list[tuple[str, Any]]:
        """The plugins a composite method is made of, as ``(name, instance)`` pairs.

        The harness registers each on the run's manager beside the method (recursively: a
        component may have components), saves each one's :meth:`state_dict` under its name and
        times each as method work. SparsAE returns its mask search, regrowth, burn-in and
        distillation. Default: none.
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly.

        Checkpoints load with ``torch.load(weights_only=True)``: use tensors, numbers, strings,
        bools, None, lists, tuples and dicts only (no numpy arrays, no objects). Tensors come
        back on the device they were saved from.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after ``configure`` on a resumed run)."""


#: Every attribute of the contract the harness reads; each is declared on :class:`Method`.
CONTRACT = ("name", "Config", "changes_density", "keeps_dense_weights", "min_heldout_batches", "requires", "ignores_sparsity", "observer", "hookspecs",
            "config", "components", "state_dict", "load_state_dict")


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
