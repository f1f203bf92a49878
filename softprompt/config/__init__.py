"""Typed arguments for every command, their validation, and YAML config files.

Each dataclass field is also a CLI flag (``num_virtual_tokens`` -> ``--num-virtual-tokens``) and a key in
a YAML config file, where fields are grouped by section (``model:``, ``data:``, ``prompt:``, ``train:``,
``eval:``, ``serve:``). Precedence: defaults < YAML file < flags given on the command line.
``__post_init__`` checks every field and reports all problems at once, each naming its flag.

- :mod:`.sections`: the dataclasses;
- :mod:`.checks`: the checks commands share (finite numbers, seeds, folders and files to write, the
  context length);
- :mod:`.files`: reading YAML config files and layering them under the flags;
- :mod:`.typed`: the type check of every field, whether from a flag, a config file or Python.
"""

from softprompt.config.checks import (
    MAX_SEED,
    MIN_MAX_LENGTH,
    ConfigError,
    check_file_to_write,
    check_folder_to_create,
    check_real,
    check_seed,
    fit_max_length,
    flag,
    generate_flag_problems,
    keep_problems,
    raise_problems,
    store_task_problems,
)
from softprompt.config.files import build_args, given, load_yaml, template_flag, to_yaml
from softprompt.config.sections import (
    SCHEDULES,
    SECTIONS,
    DataArgs,
    EvalArgs,
    ModelArgs,
    PromptArgs,
    ServeArgs,
    TrainArgs,
)
from softprompt.config.typed import check_field_types, field_type

__all__ = ["MAX_SEED", "MIN_MAX_LENGTH", "SCHEDULES", "SECTIONS", "ConfigError", "DataArgs", "EvalArgs", "ModelArgs",
           "PromptArgs", "ServeArgs", "TrainArgs", "build_args", "check_field_types", "check_file_to_write",
           "check_folder_to_create", "check_real", "check_seed", "field_type", "fit_max_length", "flag",
           "generate_flag_problems", "given", "keep_problems", "load_yaml", "raise_problems", "store_task_problems",
           "template_flag", "to_yaml"]
