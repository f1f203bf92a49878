"""Stored prompts: the on-disk format (PEFT-compatible), PEFT import/export, safe task names, PromptStore."""

from softprompt.store.entries import EnsembleSpec, StoreEntry
from softprompt.store.errors import StoreError
from softprompt.store.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    META_NAME,
    WEIGHTS_NAME,
    StoredPrompt,
    check_model_compatible,
    load_prompt,
    save_prompt,
)
from softprompt.store.names import safe_task_name
from softprompt.store.peft_interop import export_peft, import_peft
from softprompt.store.preflight import prompt_entry_problem, stored_member_problem
from softprompt.store.prompt_store import PromptStore

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "META_NAME",
    "WEIGHTS_NAME",
    "EnsembleSpec",
    "PromptStore",
    "prompt_entry_problem",
    "stored_member_problem",
    "StoreEntry",
    "StoreError",
    "StoredPrompt",
    "check_model_compatible",
    "export_peft",
    "import_peft",
    "load_prompt",
    "safe_task_name",
    "save_prompt",
]
