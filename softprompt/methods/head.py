"""The trainable classification head of encoder sequence classification (prompt + head).

An encoder (BERT, RoBERTa, DeBERTa, ...) has no language-model head to rank label words with, so the task
trains a soft prompt together with the model's sequence-classification head (as PEFT's ``SEQ_CLS`` task
type does). The head's tensors are owned here, not by the frozen model: :mod:`softprompt.forward` runs the
model with these tensors substituted for its own head (``torch.func.functional_call``), so one frozen
model serves any number of tasks, each with its own head and number of labels.

The head is what PEFT trains for ``SEQ_CLS``: every module whose name ends with ``classifier`` or ``score``
(PEFT's ``modules_to_save`` rule, :func:`saved_by_peft`: the head child, and DistilBERT's ``pre_classifier``
too), plus every weight outside them that the checkpoint lacked at load
(:func:`~softprompt.forward.classifier.untrained_weights`: DeBERTa's ``pooler.dense``, DistilBERT's
``pre_classifier``, BERT's pooler in a checkpoint saved without it), which transformers would otherwise
initialise at random at every load. Its tensors are stored in
``adapter_model.safetensors`` under PEFT's keys (``base_model.classifier.weight``,
``base_model.pooler.dense.weight``) and the extra modules listed in ``modules_to_save``, so the folder loads
into ``PeftModelForSequenceClassification`` and back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from softprompt.forward.classifier import HEAD_CHILDREN, head_child, untrained_weights

HEAD_MODULE_NAMES = HEAD_CHILDREN  # what PEFT puts in modules_to_save for SEQ_CLS
SAVED_PREFIX = "base_model."  # PEFT's key prefix of modules_to_save tensors


def head_module_name(model) -> str:
    """Name of the model's classification head child (``classifier`` or ``score``)."""
    return head_child(model)


def in_classifier(name: str) -> bool:
    """A head parameter name inside the classification head child (not a weight the checkpoint lacked)."""
    return name.startswith(tuple(f"{m}." for m in HEAD_MODULE_NAMES))


def is_head_key(key: str) -> bool:
    """A stored tensor key that belongs to the head (not to the prompt)."""
    return key.startswith(SAVED_PREFIX)


def saved_by_peft(key: str, modules_to_save: Iterable[str]) -> bool:
    """Whether stored tensor ``key`` (``base_model.pre_classifier.weight``) lies in a module PEFT trains, saves
    and loads back for ``modules_to_save``: PEFT wraps every module whose dotted name *ends with* an entry, as a
    string (``peft.utils.other._set_trainable``), so ``classifier`` also takes DistilBERT's ``pre_classifier``,
    and a folder without its tensors fails ``PeftModel.from_pretrained``."""
    parts = key.split(".")[:-1]  # the modules holding the tensor, outermost first
    entries = [m for m in modules_to_save if isinstance(m, str) and m]
    return any(".".join(parts[:i]).endswith(m) for i in range(2, len(parts) + 1) for m in entries)


def peft_head_parameters(model) -> list[str]:
    """``model``'s parameters PEFT trains and saves for ``SEQ_CLS`` (:func:`saved_by_peft` of ``classifier``,
    ``score``): the head child's first, then the others (DistilBERT's ``pre_classifier``), in the model's order."""
    names = [n for n, _ in model.named_parameters() if saved_by_peft(SAVED_PREFIX + n, HEAD_MODULE_NAMES)]
    return sorted(names, key=lambda n: not in_classifier(n))  # stable: the model's order within each group


class ClassificationHead(nn.Module):
    """Trainable tensors replacing a sequence classifier's head, by parameter name (``classifier.weight``).

    Kept in fp32 whatever the model dtype (like the prompts); :meth:`overrides` casts them for the forward.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        if not tensors:
            raise ValueError("a classification head needs at least one tensor")
        self.names = sorted(tensors)
        self.tensors = nn.ParameterList([nn.Parameter(tensors[n].detach().to(torch.float32).clone())
                                         for n in self.names])

    @classmethod
    def create(cls, model, seed: int = 0) -> ClassificationHead:
        """A freshly initialised head shaped like ``model``'s: weights ~ N(0, initializer_range), biases 0.

        The shapes follow the model as loaded (its ``num_labels``); the init is seeded so that runs repeat
        whether or not the checkpoint shipped a head. Weights outside the head that the checkpoint lacked
        (:func:`~softprompt.forward.classifier.untrained_weights`) join it, initialised the same way after the
        head's own (a 1-D ``weight``, a norm's gain, at 1). Another module PEFT trains with the head
        (:func:`peft_head_parameters`: DistilBERT's ``pre_classifier``) that the checkpoint has starts from the
        model's own values, as PEFT's copy of it does.
        """
        head_module_name(model)  # raises for a model without a head child
        std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
        gen = torch.Generator().manual_seed(seed)
        params = dict(model.named_parameters())
        untrained = untrained_weights(model)
        tensors = {}
        for key in dict.fromkeys([*peft_head_parameters(model), *untrained]):
            shape = params[key].shape
            if not in_classifier(key) and key not in untrained:  # trained on from the checkpoint's values
                tensors[key] = params[key].detach().clone()
            elif len(shape) > 1:
                tensors[key] = torch.randn(shape, generator=gen) * std
            else:
                tensors[key] = torch.ones(shape) if key.endswith("weight") and not in_classifier(key) else torch.zeros(
                    shape)
        return cls(tensors)

    @property
    def num_labels(self) -> int:
        """Number of classes: the output size of the head's last layer."""
        return int(self.tensors[self.names.index(self.output_key())].shape[0])

    def output_key(self) -> str:
        """Name of the last layer's weight (the one whose rows are the classes)."""
        inside = [n for n in self.names if in_classifier(n)] or self.names
        weights = [n for n in inside if n.endswith("weight")]
        # heads are named in forward order (classifier.dense, classifier.out_proj; classifier alone)
        return (weights or inside)[-1]

    def extra_modules(self) -> list[str]:
        """Modules outside the classification head child whose weights it holds (the checkpoint lacked them):
        what ``modules_to_save`` lists besides ``classifier`` and ``score``."""
        return sorted({n.rsplit(".", 1)[0] for n in self.names if not in_classifier(n)})

    def overrides(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` for ``functional_call``, on ``like``'s device and dtype (differentiable)."""
        return {n: t.to(device=like.device, dtype=like.dtype) for n, t in zip(self.names, self.tensors, strict=True)}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's ``modules_to_save`` keys (``base_model.classifier.weight``)."""
        return {SAVED_PREFIX + n: t.detach().cpu().contiguous() for n, t in zip(self.names, self.tensors,
                                                                                strict=True)}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor]) -> ClassificationHead:
        """Rebuild from stored tensors (keys with :data:`SAVED_PREFIX`)."""
        return cls({k[len(SAVED_PREFIX):]: v for k, v in tensors.items() if is_head_key(k)})


def head_problems(tensors: dict[str, torch.Tensor], model) -> list[str]:
    """Why stored head tensors cannot replace ``model``'s head (empty when they can).

    Every tensor must name a parameter of the model's head, of another module PEFT trains with it
    (:func:`peft_head_parameters`: DistilBERT's ``pre_classifier``), or one the checkpoint lacked at load
    (:func:`~softprompt.forward.classifier.untrained_weights`), and have its shape, except that the number of
    classes (the first dimension of the output layer) may differ: one frozen model serves heads of any
    label count. Every weight the checkpoint lacked must be there: the model's own is random at each load.
    """
    params = dict(model.named_parameters())
    head = ClassificationHead.from_saved(tensors)
    out_key = head.output_key()
    problems = []
    inside = head_module_name(model) + "."
    untrained = untrained_weights(model)
    with_head = [n for n in peft_head_parameters(model) if not n.startswith(inside) and n not in untrained]
    if not any(n.startswith(inside) for n in head.names):
        problems.append(f"no head tensor is in the model's head {inside[:-1]!r}")
    for name, t in zip(head.names, head.tensors, strict=True):
        if not name.startswith(inside) and name not in untrained and name not in with_head:  # an encoder weight
            also = f" or among the weights its checkpoint lacks ({', '.join(untrained)})" if untrained else ""
            also += f" or the modules PEFT trains with it ({', '.join(with_head)})" if with_head else ""
            problems.append(f"head tensor {SAVED_PREFIX + name!r} is outside the model's head {inside[:-1]!r}{also}: "
                            "a stored prompt may replace the head only, never the frozen model's weights")
            continue
        if name not in params:
            problems.append(f"head tensor {SAVED_PREFIX + name!r} names no parameter of {type(model).__name__} "
                            f"(its head is {head_module_name(model)!r})")
            continue
        want = tuple(params[name].shape)
        got = tuple(t.shape)
        label_dim = name == out_key or (name.endswith("bias") and name[:-4] + "weight" == out_key)
        if (got[1:] != want[1:] or len(got) != len(want)) if label_dim else got != want:
            problems.append(f"head tensor {SAVED_PREFIX + name!r} has shape {got}, the model's has {want}")
    bias = out_key[:-len("weight")] + "bias" if out_key.endswith("weight") else None
    if bias in head.names and head.tensors[head.names.index(bias)].shape[0] != head.num_labels:
        problems.append(f"head tensors {SAVED_PREFIX + out_key!r} and {SAVED_PREFIX + bias!r} disagree on the "
                        "number of labels")
    absent = [n for n in untrained if n not in head.names]
    if absent:
        problems.append(f"the checkpoint lacks {', '.join(absent)}, which transformers initialises at random at "
                        "every load, and the prompt does not bring it: it was trained against another random "
                        "layer (stored by an older softprompt, or trained on a checkpoint that has it); train it "
                        "again on this checkpoint")
    return problems
