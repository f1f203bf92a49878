"""softprompt: train, store, evaluate and serve soft prompts for one frozen language model.

Public API (imported lazily so ``import softprompt`` stays cheap)::

    from softprompt import load_base_model, load_task, build_method, TrainArgs
    from softprompt import compute_prompt_kv, evaluate_prompt, save_prompt, load_prompt
    from softprompt.train import train

``train`` is not exported here: the package attribute of that name is the ``softprompt.train`` module (importing a
submodule binds it on the package), so ``from softprompt import train`` gives the module, not the function.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_base_model": "softprompt.model",
    "fingerprint": "softprompt.model",
    "load_task": "softprompt.data",
    "TaskFormat": "softprompt.data",
    "build_method": "softprompt.methods",
    "PromptTuning": "softprompt.methods",
    "PromptTuningConfig": "softprompt.methods",
    "TrainArgs": "softprompt.config",
    "compute_prompt_kv": "softprompt.forward",
    "generate": "softprompt.forward",
    "evaluate_prompt": "softprompt.evaluate",
    "save_prompt": "softprompt.store",
    "load_prompt": "softprompt.store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
