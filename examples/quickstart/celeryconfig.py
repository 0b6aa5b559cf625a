"""The ready app's configuration: the commands module, and nothing else.

No broker and no database named: the embedded default applies (a SQLite file and a
filesystem broker under ``ORCH_OUTBOX_HOME``, ``./.orch_outbox`` when unset).
"""

imports = ("commands",)
