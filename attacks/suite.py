"""The attack grid: tasks x defences x attackers x students x seeds, resumable, with an honest report.

This module is the public import point of the attack suite; it holds no code of its own and re-exports the
names of the three modules that do one job each:

* :mod:`attacks.config`: :class:`Suite` and :class:`Defence` (a suite file, validated by
  :mod:`attacks.schema`), :data:`BUNDLED` teachers, :data:`SUITES` and :func:`packaged_suites`;
* :mod:`attacks.runner`: :class:`Runner` (identified, resumable runs under ``OUT/runs/``, cached teachers under
  ``OUT/teachers/``), :func:`run_key`, :data:`RUN_SCHEMA`, :data:`ID_CHARS`, :class:`StepCounter` and
  :func:`step_file` (progress of runs in flight), :func:`dihedral`;
* :mod:`attacks.report`: :func:`summarize`, :func:`paired_bootstrap`, :func:`competence`,
  :func:`write_report` and :func:`draw` (``OUT/report.json``, ``OUT/report.md`` and pictures).

To replace what a runner calls (in tests, say), patch the name in the module that uses it
(``attacks.runner.provenance``, ``attacks.runner.attacks_fingerprint``), not here.
"""
from __future__ import annotations

from .config import BUNDLED, SUITES, Defence, Suite, packaged_suites
from .report import BOOTSTRAP_SAMPLES, COMPETENCE_MARGIN, competence, draw, paired_bootstrap, summarize, write_report
from .runner import ID_CHARS, RUN_SCHEMA, Runner, StepCounter, dihedral, run_key, step_file

__all__ = ["BOOTSTRAP_SAMPLES", "BUNDLED", "COMPETENCE_MARGIN", "Defence", "ID_CHARS", "RUN_SCHEMA", "Runner",
           "SUITES", "StepCounter", "Suite", "competence", "dihedral", "draw", "packaged_suites",
           "paired_bootstrap", "run_key", "step_file", "summarize", "write_report"]
