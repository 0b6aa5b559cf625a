"""``python -m orch_outbox.cli``."""

from . import main

main()
