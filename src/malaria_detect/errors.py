"""The project's own errors: a problem with what the user gave (a file, a folder, a model, a setting,
an option), whose one-line message says what is wrong and what to do.

Every such error derives from `MalariaDetectError`, so the command line can report exactly these in
one line and let anything else (a bug) show its traceback. The concrete classes live next to the
code that raises them (`data.DataError`, `imaging.ImageError`, `record.RecordError`,
`fields.segment.SegmentationError`, `serve.settings.SettingsError`, ...); those raised by several modules are
here. This module has no dependencies, so each of them can import it.
"""

from __future__ import annotations


class MalariaDetectError(Exception):
    """Base of the errors whose message is meant for the user (the CLI prints it in one line)."""


class UsageError(MalariaDetectError, ValueError):
    """An argument or option that cannot be used as given (e.g. split fractions that do not sum to 1)."""


class MissingFileError(MalariaDetectError, FileNotFoundError):
    """A file the user named (a model, a checkpoint) that is not there."""


class ModelError(MalariaDetectError, ValueError):
    """A model file or checkpoint that must not be used (damaged, or not the file it claims to be)."""
