"""Batched multi-task inference: one frozen model, many cached prompts, mixed-task batches, ensembles."""

from softprompt.engine.batching import MixedBatch, Row, mixed_batches
from softprompt.engine.engine import Engine, Task, task_format
from softprompt.engine.prompt_table import PromptTable
from softprompt.engine.requests import (
    MAX_TOP_LOGPROBS,
    ChatLayoutError,
    ClassifyRequest,
    ClassifyResult,
    EngineError,
    GenerateRequest,
    GenerateResult,
    RequestError,
    ScoreRequest,
    ScoreResult,
    TooLongError,
    UnknownTaskError,
)
from softprompt.engine.turns import refuse_chat, require_chat_layout
from softprompt.forward import TokenLogprob

__all__ = [
    "MAX_TOP_LOGPROBS",
    "ChatLayoutError",
    "ClassifyRequest",
    "ClassifyResult",
    "Engine",
    "EngineError",
    "GenerateRequest",
    "GenerateResult",
    "MixedBatch",
    "PromptTable",
    "RequestError",
    "Row",
    "ScoreRequest",
    "ScoreResult",
    "Task",
    "TokenLogprob",
    "TooLongError",
    "UnknownTaskError",
    "mixed_batches",
    "refuse_chat",
    "require_chat_layout",
    "task_format",
]
