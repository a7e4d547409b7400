"""The exceptions medidiff raises for problems a user can fix.

Every error the CLI reports is a :class:`MedidiffError`: it is printed as one line on
stderr (``medidiff: error: ...``) with a non-zero exit status, never as a traceback.
Messages name the file, key or argument at fault and, where one exists, the fix.
"""

from __future__ import annotations


class MedidiffError(Exception):
    """Base class: a problem with the user's input, config, checkpoint or environment."""

    exit_code = 1


class VolumeError(MedidiffError):
    """A volume file is missing, unreadable, corrupt, truncated or of an unsupported format."""


class VolumeContentError(VolumeError):
    """A volume was read but its content is unusable (4D where 3D is needed, NaN/Inf, empty)."""


class ConfigError(MedidiffError):
    """A config file or ``--set`` override has an unknown key, a wrong type or a bad value."""


class CheckpointError(MedidiffError):
    """A checkpoint is missing, unsafe, corrupt or does not match the model it is loaded into."""


class DataError(MedidiffError):
    """A datalist, folder or glob names no usable inputs, or its entries are inconsistent."""


class OutputError(MedidiffError):
    """An output path cannot be written (exists without ``--overwrite``, read-only, ...)."""


class TrainingDivergedError(MedidiffError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class InputProfileError(VolumeContentError):
    """A scan does not look like the model's training inputs (CT given to an MRI model, a
    scan with its skull given to a skull-stripped model, ...), refused under ``--strict``."""
