"""The AWS IoT Jobs device API over MQTT (boto3-compatible client and shapes)."""

from agent.jobs.client import JobsClient, JobsEvent

__all__ = ["JobsClient", "JobsEvent"]
