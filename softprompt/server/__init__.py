"""HTTP layer over the engine: OpenAI-compatible completions/chat, classify, score, models, health,
metrics and admin endpoints, with a dynamic-batching scheduler in front of the engine."""

from softprompt.server.app import ServerState, create_app
from softprompt.server.scheduler import QueueFullError, Scheduler

__all__ = ["QueueFullError", "Scheduler", "ServerState", "create_app"]
