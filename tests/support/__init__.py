"""Helpers shared by the suites and scripts that run real processes (``tests/e2e``, ``tests/faults``,
``scripts/soak.py``): one copy of each.

- :mod:`.procs` — :class:`~.procs.Proc` (a subprocess in its own process group, its output in a log
  file), spawning, stopping, the subprocess environment, one-shot commands, ``children_of``,
  ``free_port``, ``tail``;
- :mod:`.waiting` — :func:`~.waiting.wait_until`, the bounded wait every other wait is built on;
- :mod:`.project` — the mixin of the test projects (spawn into the folder, rows, ``wait_for``,
  ``wait_status``, ``wait_drained``);
- :mod:`.broker` — queue depth and queue deletion.

Under pytest this package is ``support`` (``tests/`` is on ``sys.path``, as for ``conftest``);
``scripts/soak.py`` imports it as ``tests.support`` from the repository root. Its modules import
each other relatively and import nothing of ``orch_outbox``, so either name works and importing it
configures no app.
"""
