"""The ONLY code that touches the Hugging Face forward pass: one module per model family behind one interface.

:func:`family_of` chooses a loaded model's :class:`Family` once (:func:`family_for_config` chooses it from a
config before loading); callers ask the family what to do (its capabilities and operations) instead of
asking which family a model is:

- :mod:`.causal`: decoder-only LMs, the prompt's keys/values computed once and shared by every row;
- :mod:`.seq2seq`: encoder-decoders (T5), the prompt in front of the encoder input;
- :mod:`.classifier`: encoder sequence classifiers, the prompt in front of the input and its own head;
- :mod:`.common`: what they share (the cache-argument shim, :class:`PromptKV`, :class:`RowPrompts`,
  positions, per-row sampling);
- :mod:`.head`: a causal LM's head as the model applies it (its logit scaling or soft-capping), checked once
  per model against the model's own forward; :mod:`.probe`: its prompt paths (concat, cached keys/values,
  left padding) checked the same way (:meth:`Family.model_problem` says why a model is refused).

    family = family_of(model)
    prompt = family.inference_prompt(model, method())   # under torch.no_grad()
    scores = family.label_scores(model, tokenizer, prompt, examples, fmt, batch_size=32)
"""

from softprompt.forward.choose import (
    FAMILIES,
    TASK_TYPES,
    FamilyError,
    compute_prompt_kv,
    family_for_config,
    family_of,
    generate,
    position_offset,
    task_type_for_stored,
    task_type_problem,
    trails_source,
)
from softprompt.forward.common import (
    PROMPT_PASSES,
    Decoded,
    InjectionError,
    PromptKV,
    RowPrompts,
    RowSampling,
    TokenLogprob,
    end_token_ids,
    label_token_ids,
    sample_next,
    text_config,
    text_position_ids,
    token_logprobs,
)
from softprompt.forward.family import BatchPrompt, Family, InferencePrompt, StepPrompt
from softprompt.forward.head import logits_from_hidden
from softprompt.forward.probe import local_window, rope_switch, sliding_window
from softprompt.forward.prompt import PromptOutput

__all__ = [
    "FAMILIES",
    "PROMPT_PASSES",
    "TASK_TYPES",
    "BatchPrompt",
    "Decoded",
    "Family",
    "FamilyError",
    "InferencePrompt",
    "InjectionError",
    "PromptKV",
    "PromptOutput",
    "RowPrompts",
    "RowSampling",
    "TokenLogprob",
    "StepPrompt",
    "compute_prompt_kv",
    "end_token_ids",
    "family_for_config",
    "family_of",
    "generate",
    "label_token_ids",
    "logits_from_hidden",
    "position_offset",
    "rope_switch",
    "sample_next",
    "sliding_window",
    "local_window",
    "text_config",
    "task_type_for_stored",
    "task_type_problem",
    "trails_source",
    "text_position_ids",
    "token_logprobs",
]
