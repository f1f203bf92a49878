"""Stored prompts: the on-disk format (PEFT-compatible), PEFT import/export, safe task names, PromptStore."""

from softprompt.store.entries import EnsembleSpec, StoreEntry
from softprompt.store.errors import StoreError
from softprompt.store.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    META_NAME,
    PEFT_TYPE_TO_METHOD,
    PEFT_TYPES,
    WEIGHTS_NAME,
    PeftType,
    StoredPrompt,
    check_model_compatible,
    load_prompt,
    register_peft_type,
    save_prompt,
)
from softprompt.store.names import safe_task_name
from softprompt.store.peft_interop import export_peft, import_peft
from softprompt.store.registry import PromptStore

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "META_NAME",
    "PEFT_TYPES",
    "PEFT_TYPE_TO_METHOD",
    "WEIGHTS_NAME",
    "EnsembleSpec",
    "PeftType",
    "PromptStore",
    "StoreEntry",
    "StoreError",
    "StoredPrompt",
    "check_model_compatible",
    "export_peft",
    "import_peft",
    "load_prompt",
    "register_peft_type",
    "safe_task_name",
    "save_prompt",
]
