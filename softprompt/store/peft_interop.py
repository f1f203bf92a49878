"""Conversion between our stored prompts and PEFT's prompt-tuning folders.

Our folders are already PEFT folders plus ``softprompt.json``; these helpers make the conversion
explicit: :func:`import_peft` validates a PEFT folder against a base model and records the model's
fingerprint, :func:`export_peft` writes only PEFT's files. Neither needs ``peft`` installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from softprompt.store.atomic import write_folder_atomically
from softprompt.store.format import StoreError, load_prompt, replaceable_folder, save_prompt, write_peft_files

log = logging.getLogger(__name__)


def import_peft(src: str | Path, dst: str | Path, model, task: dict | None = None,
                overwrite: bool = False) -> Path:
    """Store a PEFT prompt folder in our format, fingerprinted against ``model``.

    Args:
        src: folder written by PEFT's ``save_pretrained`` (``adapter_model.safetensors`` +
            ``adapter_config.json``; pickle ``adapter_model.bin`` is refused).
        dst: our folder to create.
        model: the base model the prompt belongs to (hidden size is checked; its fingerprint is stored).
        task: template / verbalizer etc. to record (default: whatever ``src`` records, if it is ours).
        overwrite: replace an existing stored prompt at ``dst``.

    Returns:
        The absolute ``dst``.

    Raises:
        StoreError: ``src`` is not a valid prompt for ``model``, or ``dst`` exists.
    """
    stored = load_prompt(src, model=model)
    if Path(src).expanduser().resolve() == Path(dst).expanduser().resolve():
        raise StoreError(f"{dst}: import source and destination are the same folder")
    meta = stored.meta
    record = stored.task_record
    task = task if task is not None else (None if record is None else record.to_dict())
    # a PEFT folder's prompt was trained on [prompt, BOS, text]; one of ours keeps its recorded layout
    return save_prompt(dst, stored.build_method(), model, task=task, train_config=meta.get("train_config"),
                       metrics=meta.get("metrics"), overwrite=overwrite, bos=stored.bos)


def export_peft(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a stored prompt as a plain PEFT folder for ``PeftModel.from_pretrained(base, dst)``.

    Args:
        src: our stored prompt (or a PEFT folder).
        dst: folder to create with ``adapter_model.safetensors`` and ``adapter_config.json`` only.
        overwrite: replace an existing stored prompt at ``dst``.

    Returns:
        The absolute ``dst``.

    Raises:
        StoreError: ``src`` is invalid, or ``dst`` exists.
    """
    stored = load_prompt(src)
    if Path(src).expanduser().resolve() == Path(dst).expanduser().resolve():
        raise StoreError(f"{dst}: export source and destination are the same folder")
    if not stored.bos:  # PEFT's files have no field for it: read back, the folder means [P, BOS, text]
        log.warning("%s was trained without the tokenizer's special tokens around its text (no BOS after the "
                    "prompt: --objective lm, a chat task, or stored before the BOS was placed; on T5, no </s> "
                    "after the source); a PEFT folder cannot record that: loaded back it reads as PEFT lays text "
                    "out ([prompt, BOS, text]). Keep the full folder (store export without --peft) to serve it "
                    "here", src)
    return write_folder_atomically(dst, lambda tmp: write_peft_files(tmp, stored.tensors, stored.peft_config),
                                   overwrite, replaceable_folder)
