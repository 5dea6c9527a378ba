"""AWS IoT Commands on the device: one request over MQTT 5, the same handlers as jobs.

:class:`CommandsClient` is the protocol (requests, updates, on the agent's MQTT 5 connection),
:class:`CommandExecutor` runs what the requests ask for, :class:`CommandJournal` keeps each
execution by its executionId. Off unless ``commands: {enabled: true}``.
"""

from agent.commands.client import CommandRequest, CommandsClient
from agent.commands.executor import CommandExecutor
from agent.commands.journal import CommandJournal

__all__ = ["CommandExecutor", "CommandJournal", "CommandRequest", "CommandsClient"]
