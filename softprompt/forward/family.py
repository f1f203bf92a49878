"""The interface every model family implements: what it is, what it can do, and its forward operations.

A family is chosen once per model (:func:`softprompt.forward.family_of`); callers ask it what to do instead
of asking which family a model is. The three implementations are stateless singletons whose operations
take the model as their first argument:

- :class:`~softprompt.forward.causal.CausalLM` (``causal_lm``): a decoder-only LM. The prompt's keys/values
  are computed once and reused; the mixed-batch engine serves it.
- :class:`~softprompt.forward.seq2seq.Seq2SeqLM` (``seq2seq_lm``): an encoder-decoder (T5). The prompt goes
  in front of the encoder input, so its states depend on the text: nothing to cache, not served by the engine.
- :class:`~softprompt.forward.classifier.EncoderClassifier` (``seq_cls``): an encoder with a
  sequence-classification head. Each prompt brings its trained head; it classifies, it does not generate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeAlias

import torch

from softprompt.data import Batch, Encoded, Example, TaskFormat
from softprompt.forward.common import Decoded, PromptKV, RowPrompts, RowSampling, TokenLogprob
from softprompt.forward.prompt import PromptOutput

#: A prompt prepared for inference (:meth:`Family.inference_prompt`), one type per family: a causal LM's
#: shared :class:`PromptKV`; a seq2seq LM's ``(P, H)`` encoder-input embeddings; a classifier's checked
#: :class:`PromptOutput` (embeddings or none, and its head). ``None``: no prompt (causal and seq2seq).
InferencePrompt: TypeAlias = PromptKV | torch.Tensor | PromptOutput | None

#: A prompt for one training step (:meth:`Family.step_prompt`): an :data:`InferencePrompt` that keeps its
#: gradients; a causal LM may also take ``(P, H)`` embeddings to prepend to every row (the ``concat`` pass).
StepPrompt: TypeAlias = PromptKV | torch.Tensor | PromptOutput | None

#: What a batch-level operation takes: a step or inference prompt, or one prompt per row (causal only).
BatchPrompt: TypeAlias = PromptKV | RowPrompts | torch.Tensor | PromptOutput | None


class FamilyError(ValueError):
    """A ``--task-type`` that is unknown or that the checkpoint's architecture cannot take."""


class Family:
    """One model family's forward pass. Subclasses set the class attributes and implement the operations.

    Attributes:
        name: the ``--task-type`` it is loaded as: ``causal_lm``, ``seq2seq_lm`` or ``seq_cls``.
        peft_task_type: PEFT's ``task_type`` for ``adapter_config.json``.
        description: how messages name it (``an encoder-decoder``).
        caches_prompt: a prompt's keys/values are computed once and reused for every row and request.
        generates: it has an LM head: it generates text, scores continuations and ranks label words.
        has_head: prompts train and serve with their own classification head (``PromptOutput.head``).
        served: the mixed-batch engine (:class:`~softprompt.engine.Engine`) serves it.
        models_text: it trains on plain text (``--objective lm``, :mod:`softprompt.data.corpus`).
        trails_source: its sources end with the tokenizer's special token (:meth:`trail_ids`: T5's ``</s>``).
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str]
    description: ClassVar[str]
    caches_prompt: ClassVar[bool] = False
    generates: ClassVar[bool] = True
    has_head: ClassVar[bool] = False
    served: ClassVar[bool] = True
    models_text: ClassVar[bool] = False
    trails_source: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family {self.name!r}>"

    # ------------------------------------------------------------------------------ loading and data
    def from_pretrained(self, name_or_path: str, dtype: torch.dtype, num_labels: int | None = None):
        """Load a checkpoint as this family (the right ``AutoModel*`` class); raises OSError/ValueError."""
        raise NotImplementedError

    def model_problem(self, model) -> str | None:
        """Why prompts cannot run on ``model`` as this family runs them, or None: a check made once per model
        (a few tokens through the model's own forward and the family's path), before any work is done."""
        return None

    def check_model(self, model) -> None:
        """Raise :class:`FamilyError` when a prompt cannot go in front of ``model``'s input (checked once, at load,
        on its device): :meth:`model_problem`, and in the encoder families a one-time comparison of the forward on
        ids and on their embeddings."""
        problem = self.model_problem(model)
        if problem:
            raise FamilyError(problem)

    def format_problem(self, model, fmt: TaskFormat) -> str | None:
        """Why a task format cannot train or evaluate on ``model``, or None when it fits."""
        if fmt.objective == "lm" and not self.models_text:
            return (f"--objective lm needs a decoder-only language model; {type(model).__name__} is "
                    f"{self.description}")
        return None

    def lead_ids(self, tokenizer, bos: bool = True) -> list[int]:
        """The ids a text starts with, right after the prompt (at position 0 without one): the one place
        that decides where a model's BOS goes.

        A causal LM's text starts with the tokenizer's leading special tokens (its BOS, as PEFT lays it
        out: ``[prompt, BOS, text]``) when ``bos``; ``bos=False`` is the layout of a prompt stored before
        softprompt put the BOS there, and of text after a hard prompt that starts with the BOS itself.
        Other families keep their own layout: an encoder-decoder's input gets no special tokens in front
        (T5 adds only an EOS at the end), a classifier tokenises with its own ``[CLS] ... [SEP]``.
        """
        return []

    def trail_ids(self, tokenizer, bos: bool = True) -> list[int]:
        """The ids a source ends with, as the model reads it (``bos``: the tokenizer's own special tokens, as
        PEFT users tokenise: see :meth:`lead_ids`): none here; an encoder-decoder's encoder input ends with
        its ``</s>``."""
        return []

    def encode_examples(self, tokenizer, examples: list[Example], fmt: TaskFormat, max_length: int,
                        bos: bool = True) -> list[Encoded]:
        """Training examples as this family trains on them (target tokens, or class indices); ``bos``: see
        :meth:`lead_ids`."""
        raise NotImplementedError

    def label_lengths(self, tokenizer, fmt: TaskFormat) -> list[int]:
        """Per label, how many target units its score sums (for a per-token loss): tokens, or 1 class."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ prompts
    def inference_prompt(self, model, prompt: PromptOutput | torch.Tensor | None) -> InferencePrompt:
        """A method's output (or ``(P, H)`` embeddings) prepared once for inference, checked against the model.

        Gradients flow through the result when the prompt requires grad; call under ``torch.no_grad()``
        for inference.
        """
        raise NotImplementedError

    def step_prompt(self, model, prompt: PromptOutput | torch.Tensor, mode: str = "auto") -> StepPrompt:
        """The prompt for one training step; ``mode`` is one of ``PROMPT_PASSES`` (see the causal family)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ operations
    def loss(self, model, batch: Batch, prompt: BatchPrompt) -> torch.Tensor:
        """The training loss of a batch (mean over target tokens, or over examples for class labels)."""
        raise NotImplementedError

    def target_logprobs(self, model, batch: Batch, prompt: BatchPrompt) -> torch.Tensor:
        """Sum of log-probabilities of each row's target tokens: ``(B,)``."""
        raise NotImplementedError

    def label_scores(self, model, tokenizer, prompt: InferencePrompt, examples: list[Example], fmt: TaskFormat,
                     batch_size: int, max_length: int = 256, bos: bool = True) -> torch.Tensor:
        """A score per label for every example, ``(N, num_labels)``: summed label-token log-probabilities,
        or a head's class log-probabilities; ``bos``: see :meth:`lead_ids`."""
        raise NotImplementedError

    def decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: BatchPrompt,
               rows: list[RowSampling], eos_token_id: int | None,
               should_stop: Callable[[int, list[int], list[TokenLogprob] | None], bool] | None = None,
               ) -> Decoded:
        """Decode after left- or right-padded inputs, each row with its own settings (see the causal family)."""
        raise NotImplementedError
