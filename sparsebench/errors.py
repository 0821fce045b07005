"""Errors that reach the user as one line, without a traceback."""


class SparsebenchError(Exception):
    """Base class: the CLI prints ``str(error)`` and exits non-zero."""


class SuiteError(SparsebenchError):
    """A suite file is malformed or names something that does not exist."""


class DataError(SparsebenchError):
    """A data source cannot be read (missing file, unreachable hub, bad format)."""


class ModelError(SparsebenchError):
    """A model preset or configuration cannot be built."""


class PluginError(SparsebenchError):
    """A plugin could not be loaded, registered or configured."""


class MaskError(SparsebenchError):
    """A method returned masks that break the harness's invariants."""


class HookError(SparsebenchError):
    """A plugin's hook raised; the message names the plugin and the hook."""
