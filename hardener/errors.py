"""Errors with the exit codes of shared/design/CONVENTIONS.md.

0 hardened and validated; 1 fidelity budget failed (file still written); 2 usage error (a selector that
matched nothing included); 3 a required execution provider was unavailable; 4 invalid model or internal
error.  The CLI turns each of these into one clear message and its exit code, never a traceback.
"""
from __future__ import annotations


class HardenerError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 4


class UsageError(HardenerError):
    """Bad arguments: unknown layer, non-4D tensor, bad option values, unreadable input data."""

    exit_code = 2


class ProviderUnavailableError(HardenerError):
    """A required execution provider (for example CUDA) could not run the model."""

    exit_code = 3


class InvalidModelError(HardenerError):
    """The model file is missing, corrupt, truncated or uses something we cannot rewrite."""

    exit_code = 4


class FidelityError(HardenerError):
    """A fidelity budget failed; the hardened file and the report were still written."""

    exit_code = 1
