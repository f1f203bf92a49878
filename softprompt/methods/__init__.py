"""Prompt-learning methods behind one protocol and a registry.

Each method lives in its own module, registers itself with :func:`register_method`, and is built through
:func:`build_method` / :func:`method_from_saved`; no other code branches on a method's name.
"""

from softprompt.methods.base import (
    METHODS,
    MethodConfig,
    PromptMethod,
    PromptOutput,
    build_method,
    get_method,
    method_from_saved,
    register_method,
)
from softprompt.methods.p_tuning import PTuning, PTuningConfig
from softprompt.methods.prefix_tuning import DeepPrompt, DeepPromptConfig, PrefixTuning, PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuning, PromptTuningConfig

__all__ = [
    "METHODS",
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
    "get_method",
    "method_from_saved",
    "register_method",
]
