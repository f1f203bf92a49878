"""Task data: file formats, templates and verbalizers, built-in datasets, tokenisation and batching."""

from softprompt.data.builtin import BUILTIN_DATASETS, BuiltinSpec, builtin_spec, load_builtin
from softprompt.data.chat import (
    ChatExample,
    ChatFormat,
    bos_after_prompt,
    encode_chat,
    is_chat,
    parse_messages,
    turn_end_ids,
    turn_end_text,
)
from softprompt.data.dataset import TaskData, load_task, order_verbalizer, parse_verbalizer
from softprompt.data.formats import DataError, load_records, load_records_with_lines
from softprompt.data.init_text import default_init_text, task_init_text
from softprompt.data.template import Example, TaskFormat, placeholder_problems, template_fields
from softprompt.data.tokenize import (
    IGNORE_INDEX,
    Batch,
    Encoded,
    batches,
    collate,
    encode,
    encode_classes,
    label_room,
    leading_special_ids,
    token_counts,
    trailing_special_ids,
    with_leading,
    with_trailing,
)

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "Batch",
    "BuiltinSpec",
    "ChatExample",
    "ChatFormat",
    "DataError",
    "Encoded",
    "Example",
    "TaskData",
    "TaskFormat",
    "batches",
    "builtin_spec",
    "collate",
    "default_init_text",
    "encode",
    "encode_chat",
    "encode_classes",
    "is_chat",
    "bos_after_prompt",
    "label_room",
    "leading_special_ids",
    "load_builtin",
    "load_records",
    "load_records_with_lines",
    "load_task",
    "order_verbalizer",
    "parse_messages",
    "parse_verbalizer",
    "placeholder_problems",
    "task_init_text",
    "template_fields",
    "token_counts",
    "with_leading",
    "with_trailing",
    "trailing_special_ids",
    "turn_end_ids",
    "turn_end_text",
]
