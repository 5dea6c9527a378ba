"""``python -m agent`` is the ``iot-jobs-agent`` command."""

from agent.cli import main

raise SystemExit(main())
