"""Prompt-learning methods behind one protocol and a registry.

Each method lives in its own module, registers itself with :func:`register_method`, and is built through
:func:`build_method` / :func:`method_from_saved`; no other code branches on a method's name. Each method
owns its mapping to PEFT's format; the store finds it with :func:`method_for_peft_type`.
"""

from softprompt.methods.base import (
    METHODS,
    PEFT_TYPE_TO_METHOD,
    MethodConfig,
    PromptMethod,
    PromptOutput,
    build_method,
    checkpointing_problem,
    get_method,
    method_for_peft_type,
    method_from_saved,
    methods_stored_as,
    register_method,
)
from softprompt.methods.p_tuning import PTuning, PTuningConfig
from softprompt.methods.prefix_tuning import DeepPrompt, DeepPromptConfig, PrefixTuning, PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuning, PromptTuningConfig

__all__ = [
    "METHODS",
    "PEFT_TYPE_TO_METHOD",
    "DeepPrompt",
    "DeepPromptConfig",
    "PTuning",
    "PTuningConfig",
    "PrefixTuning",
    "PrefixTuningConfig",
    "MethodConfig",
    "PromptMethod",
    "PromptOutput",
    "PromptTuning",
    "PromptTuningConfig",
    "build_method",
    "checkpointing_problem",
    "get_method",
    "method_for_peft_type",
    "method_from_saved",
    "methods_stored_as",
    "register_method",
]
