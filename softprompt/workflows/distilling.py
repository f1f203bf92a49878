"""``softprompt distill``: compress a long hard context into ``P`` virtual tokens (context distillation).

The teacher is the frozen model with the context in front (its keys/values computed once,
:mod:`softprompt.forward.distill`); the student is the model with the soft prompt. The prompt is trained
with :func:`softprompt.train.train` (the one loop: optimizer, schedule, clipping, guard, checkpoints) whose
loss is KL(teacher || student) of the next-token distributions at every input position.

Inputs come from a file (one per line, or a field of a record file) or are sampled from the model itself
after the context (``--sample-inputs N``: temperature 1, ``--sample-length`` tokens each, seeded by
``--data-seed``). A seeded ``--held-out`` share of them is kept out of training for the report: the mean KL
of the student at init and after training, of the base model without the context (a reference), greedy
agreement with the teacher, and the tokens a request saves (context tokens - ``P``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt import methods
from softprompt.config import (
    ConfigError,
    check_field_types,
    check_real,
    check_seed,
    keep_problems,
    raise_problems,
    to_yaml,
)
from softprompt.data import DataError, Encoded, Example, TaskData, collate
from softprompt.data.corpus import TEXT_SUFFIXES, CorpusFormat, encode_corpus
from softprompt.data.formats import SUPPORTED_SUFFIXES, load_records_with_lines
from softprompt.data.splits import carve
from softprompt.forward import end_token_ids, family_of
from softprompt.forward.distill import (
    context_ids,
    context_teacher,
    distill_loss,
    greedy_pair,
    kl_per_position,
    pair_logprobs,
    sample_after_context,
)
from softprompt.model import context_length, load_model_config, load_tokenizer
from softprompt.store import PromptStore, save_prompt
from softprompt.train import train
from softprompt.workflows.loading import load_model_from_args


@dataclass
class DistillArgs:
    """The context, the inputs and the report of ``softprompt distill``."""

    context: str | None = None
    context_file: str | None = None
    inputs_file: str | None = None
    text_field: str | None = None
    sample_inputs: int = 0
    sample_length: int = 24
    held_out: float = 0.1
    distill_temperature: float = 1.0
    max_new_tokens: int = 8
    max_length: int = 256
    data_seed: int = 13

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare the values
        problems = []
        if bool(self.context) == bool(self.context_file):
            problems.append("give the context: --context TEXT or --context-file FILE (one of them)")
        if self.context_file and not Path(self.context_file).is_file():
            problems.append(f"--context-file {self.context_file}: no such file")
        if bool(self.inputs_file) == bool(self.sample_inputs):
            problems.append("give the inputs: --inputs-file FILE or --sample-inputs N (one of them)")
        if self.inputs_file and not Path(self.inputs_file).is_file():
            problems.append(f"--inputs-file {self.inputs_file}: no such file")
        for name, least in (("sample_inputs", 0), ("sample_length", 1), ("max_new_tokens", 1), ("max_length", 2)):
            if getattr(self, name) < least:
                problems.append(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        keep_problems(problems, check_real("--held-out", self.held_out, lambda v: 0 < v < 1, "in (0, 1)"),
                      check_real("--distill-temperature", self.distill_temperature, lambda v: v > 0, "> 0"),
                      check_seed("--data-seed", self.data_seed))
        raise_problems(problems)

    def context_text(self) -> str:
        """The context, read from ``--context-file`` or given by ``--context``."""
        if self.context is not None:
            return self.context
        try:
            return Path(self.context_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read --context-file {self.context_file}: {e}") from None


def read_inputs(path: str | Path, text_field: str | None = None) -> list[str]:
    """Inputs of a file: one per non-blank line of a text file, or ``text_field`` of each record of a
    ``.jsonl``/``.json``/``.csv``/``.tsv`` file.

    Raises:
        DataError: unreadable file, a record file without ``text_field``, a record without that text, no input.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES and suffix not in TEXT_SUFFIXES:  # a .ndjson was read as lines of JSON
        raise DataError(f"--inputs-file {path.name}: {suffix or 'a file without an extension'!r} is not read; "
                        f"accepted: {', '.join(TEXT_SUFFIXES)} (one input per line) and "
                        f"{', '.join(SUPPORTED_SUFFIXES)} (records, with --text-field)")
    if suffix in SUPPORTED_SUFFIXES:
        if not text_field:
            raise DataError(f"--inputs-file {path.name} holds records: name the input field, --text-field FIELD")
        records, lines = load_records_with_lines(path)
        bad = [str(line) for r, line in zip(records, lines, strict=True)
               if not isinstance(r.get(text_field), str) or not r[text_field].strip()]
        if bad:
            raise DataError(f"--inputs-file {path.name}: no text in field {text_field!r} on line(s) "
                            f"{', '.join(bad[:10])}")
        texts = [r[text_field].strip() for r in records]
    else:
        if text_field:  # it was silently unused
            raise DataError(f"--text-field names a field of a record file (.jsonl, .json, .csv, .tsv); --inputs-file "
                            f"{path.name} is plain text, one input per line: leave --text-field out")
        try:
            texts = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").split("\n") if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read --inputs-file {path}: {e}") from None
    if not texts:
        raise DataError(f"--inputs-file {path.name}: no inputs")
    return texts


def split_held_out(items: list, share: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a seeded ``share`` of ``items`` (at least one) held out; both keep their order. Every
    copy of a repeated input goes to the same side (a sampled continuation can come out twice)."""
    k = max(1, round(len(items) * share))
    if len(items) < k + 1:
        raise DataError(f"{len(items)} input(s): too few to hold out {k} for the report and train on the rest")
    held, rest = carve(items, [k], f"{seed}:distill-held-out")
    if not rest:
        raise DataError(f"{len(items)} inputs but only {len(set(items))} distinct: too few to hold out {k} for the "
                        "report and train on the rest (copies of one input go to one side)")
    return [items[i] for i in rest], [items[i] for i in held]


def held_out_kl(model, teacher, encoded: list[Encoded], prompt, pad_id: int, batch_size: int = 16) -> float:
    """Mean KL(teacher || ``prompt``) over every compared position of ``encoded`` (temperature 1)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i:i + batch_size], pad_id).to(model.device)
            kl = kl_per_position(*pair_logprobs(model, teacher, batch.input_ids, batch.attention_mask, prompt))
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / max(count, 1)


def agreement(teacher_out: list[list[int]], other: list[list[int]]) -> dict:
    """Exact (whole continuation) and token-level (same token at the same step) agreement with the teacher."""
    tokens = sum(len(t) for t in teacher_out)
    same = sum(a == b for t, o in zip(teacher_out, other, strict=True) for a, b in zip(t, o, strict=False))
    exact = sum(t == o for t, o in zip(teacher_out, other, strict=True))
    return {"greedy_exact": exact / len(teacher_out), "greedy_token": same / max(tokens, 1)}


def context_fit_problems(config, tok, context: str, args: dict, distill: DistillArgs,
                         texts: list[str] | None) -> list[str]:
    """Why the prompt would save no tokens (``--num-virtual-tokens`` at or above the context's tokens), or the
    teacher's or the student's rows would not fit the model's context (``config``'s); empty when they do. Only
    the tokenizer ``tok`` and the config: checked before the model loads.

    The teacher reads BOS + the context + an input window (its longest: the longest input, at most
    ``--max-length`` tokens) + the greedy tokens compared (``--max-new-tokens``); the student reads the
    prompt instead of the context. ``texts`` ``None``: the inputs are still to be sampled, ``--sample-length``
    tokens after the context. A model without a hard limit (relative positions) always fits.
    """
    problems = []
    ids, lead = context_ids(tok, context)
    p = args["prompt"].num_virtual_tokens
    if p is not None and p >= len(ids) - len(lead):  # saved and reported "tokens saved: -8", exit 0
        n = len(ids) - len(lead)
        problems.append(f"--num-virtual-tokens {p} >= the context's {n} tokens: the prompt would save {n - p} "
                        "tokens per request, and the context itself, served as cached keys/values, costs no more "
                        f"and is exact (it is the teacher); give --num-virtual-tokens below {n}")
    fit = context_length(config)
    if fit is None:
        return problems
    limit, key = fit
    name, n, lead = args["model"].model, len(ids), len(lead)
    if texts is None:
        longest, what = distill.sample_length, f"--sample-length {distill.sample_length}"
    else:
        longest = min(distill.max_length, max((len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts),
                                               default=0))
        what = f"the longest input window ({longest} tokens; --max-length {distill.max_length})"
    after = longest + distill.max_new_tokens
    if n + after > limit:
        problems.append(f"the context ({n} tokens with the model's leading special tokens) + {what} + "
                        f"--max-new-tokens {distill.max_new_tokens} = {n + after} positions do not fit --model "
                        f"{name}: its context is {limit} positions ({key}); shorten the context or the inputs")
    p = p or 0
    if p + lead + after > limit:
        problems.append(f"--num-virtual-tokens {p} + {what} + --max-new-tokens {distill.max_new_tokens} = "
                        f"{p + lead + after} positions (with {lead} leading special tokens) do not fit --model "
                        f"{name}'s context of {limit} positions ({key})")
    return problems


def with_tokens(tok, texts: list[str]) -> tuple[list[str], list[str]]:
    """``(kept, left_out)``: the inputs with at least one token, and those without (nothing to compare on; a
    one-token input has positions to compare, after its token). Both keep their order."""
    ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [t for t, i in zip(texts, ids, strict=True) if i], [t for t, i in zip(texts, ids, strict=True) if not i]


def sampled_texts(tok, samples: list[list[int]], end_ids) -> list[str]:
    """Sampled continuations as input texts that tokenize back to what the model wrote: each cut at its first
    end id (the model ended its text there: what followed was another text glued on), decoded with its other
    special tokens (a chat turn's markers) and its leading space kept. Stripping both made a sample " The
    answer" the input "The answer", a token the model never wrote, and joined turns into one string."""
    ends = set(end_ids)
    out = []
    for s in samples:
        s = list(s)
        cut = next((i for i, t in enumerate(s) if t in ends), len(s))
        text = tok.decode(s[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.strip():
            out.append(text)
    return out


def method_problems(args: dict) -> list[str]:
    """What makes the method settings unusable for a distillation, found without the model: the method's config
    (validated as it will be built), ``--init class_labels`` (a distilled prompt has no labels), a prefix method
    with ``--gradient-checkpointing``. They stopped a run after the model loaded, its config.yaml overwritten."""
    prompt, problems = args["prompt"], []
    keep_problems(problems, args["train"].gradient_checkpointing and methods.checkpointing_problem(prompt.method))
    if prompt.init == "class_labels":
        problems.append("--init class_labels starts the prompt from the labels' tokens, and a distilled prompt has "
                        "no labels: use --init text (the default: the context's first P tokens), random or "
                        "sample_vocab")
    else:
        try:
            prompt.method_config(args["train"].seed)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def distill_and_save(args: dict, distill: DistillArgs, store: str | None = None,
                     store_task: str | None = None) -> dict:
    """Distill the context into a prompt, report against the teacher on held-out inputs, save it.

    Args:
        args: resolved ``model``, ``prompt`` and ``train`` sections.
        distill: the context, inputs and report settings.
        store: also add the prompt to this store (created if missing).
        store_task: its task name there.

    Returns:
        The report written to ``distill.json``.

    Raises:
        ConfigError: the method settings are unusable (:func:`method_problems`, before the model loads), the
            model is not a decoder-only LM, the method does not fit it, the prompt is not shorter than the
            context, or the context or the prompt with the inputs does not fit its context length (by the
            tokenizer and the config, before the model loads; all before anything is written: a refused resume
            leaves the run's config.yaml as it was).
        DataError: unreadable context or inputs, too few inputs.
    """
    raise_problems(method_problems(args))  # before the model loads
    context = distill.context_text()
    if not context.strip():
        raise DataError("the context is empty")
    texts = read_inputs(distill.inputs_file, distill.text_field) if distill.inputs_file else None
    name = args["model"].model  # the prompt's and the inputs' fit, by the tokenizer and the config: before the model
    raise_problems(context_fit_problems(load_model_config(name), load_tokenizer(name), context, args, distill, texts))
    model, tok = load_model_from_args(args)
    family = family_of(model)
    if not (family.caches_prompt and family.models_text):
        raise ConfigError(f"softprompt distill needs a decoder-only language model (the teacher reads the context "
                          f"as cached keys/values); --model {name} is loaded as {family.description}")
    teacher = context_teacher(model, tok, context)
    if texts is None:  # sampled from the model itself, after the context
        samples = sample_after_context(model, teacher, distill.sample_inputs, distill.sample_length, distill.data_seed)
        texts = sampled_texts(tok, samples, end_token_ids(model, tok))
        source = (f"{len(texts)} continuations of the context sampled from the model (temperature 1, "
                  f"{distill.sample_length} tokens, seed {distill.data_seed})")
        raise_problems(context_fit_problems(model.config, tok, context, args, distill, texts))  # as sampled
    else:
        source = f"{len(texts)} inputs from {distill.inputs_file}"
    texts, tokenless = with_tokens(tok, texts)
    try:
        train_texts, held_texts = split_held_out(texts, distill.held_out, distill.data_seed)
    except DataError as e:
        raise DataError(f"{e}" + (f" ({len(tokenless)} more have no token, e.g. {tokenless[0]!r})" if tokenless
                                  else "")) from None
    print(f"context: {teacher.num_tokens} tokens; inputs: {source}; {len(held_texts)} held out"
          + (f"; {len(tokenless)} without a token left out (first: {tokenless[0]!r})" if tokenless else ""))
    prompt_args, derived = args["prompt"], args["prompt"].init_text is None and args["prompt"].init == "text"
    if derived:  # text init: the prompt starts as the context's first P tokens. Not in args: config.yaml records
        # init_text null, and a rerun derives it from its own context and P (the text read back as --init-text
        # started a rerun with another context or P from the old context's words)
        first = tok(context, add_special_tokens=False)["input_ids"][:prompt_args.num_virtual_tokens or None]
        prompt_args = dataclasses.replace(prompt_args, init_text=tok.decode(first).strip() or context)
    try:
        method = methods.build_method(prompt_args.method, prompt_args.method_config(args["train"].seed), model, tok)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    p = method.config.num_virtual_tokens
    fmt = CorpusFormat(note=source, min_tokens=1)  # a one-token input: compared after its token (and the context)
    held = encode_corpus(tok, held_texts, distill.max_length, fmt.min_tokens)
    held_ids = [e.input_ids for e in held]
    out = Path(args["train"].output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # as train's: a resume rewrites config.yaml once its run is over, so that a refused one (other settings, a
    # damaged checkpoint) leaves the interrupted run's own settings there
    resuming = args["train"].resume and (out / "checkpoint" / "state.json").exists()
    if not resuming:
        (out / "config.yaml").write_text(to_yaml({**args, "distill": distill}))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def measure(prompt) -> dict:
        t_out, o_out = greedy_pair(model, teacher, held_ids, prompt, distill.max_new_tokens)
        return {"kl": held_out_kl(model, teacher, held, prompt, pad, args["train"].batch_size),
                **agreement(t_out, o_out)}

    method.to(model.device).eval()
    with torch.no_grad():
        rows = {"no context (base model)": measure(None),
                "soft prompt at init": measure(family.inference_prompt(model, method()))}
    temp = distill.distill_temperature
    result = train(model, tok, method, TaskData(format=fmt, splits={"train": [Example("", t) for t in train_texts]}),
                   args["train"], max_length=distill.max_length,
                   loss_fn=lambda m, batch, prompt: distill_loss(m, teacher, batch, prompt, temp),
                   resume_key={"distill_context_sha256": hashlib.sha256(context.encode("utf-8")).hexdigest(),
                               "distill_temperature": temp}, outputs=("prompt", "distill.json"))
    if resuming:
        (out / "config.yaml").write_text(to_yaml({**args, "distill": distill}))
    method.eval()
    with torch.no_grad():
        rows["distilled soft prompt"] = measure(family.inference_prompt(model, method()))
    report = {"context_tokens": teacher.num_tokens, "num_virtual_tokens": p,
              "tokens_saved_per_request": teacher.num_tokens - p, "inputs": source, "train_inputs": len(train_texts),
              "held_out_inputs": len(held_texts), "inputs_without_tokens": len(tokenless),
              "max_new_tokens": distill.max_new_tokens, "steps": result.steps, "diverged": result.diverged,
              "held_out": rows}
    record = {"template": None, "target_field": None, "verbalizer": None, "target_prefix": None,
              "objective": "distill",
              "distilled_from": {"context_tokens": teacher.num_tokens,
                                 "context_sha256": hashlib.sha256(context.encode("utf-8")).hexdigest(),
                                 "inputs": source, "temperature": temp}}
    train_cfg = {k: dataclasses.asdict(v) for k, v in {**args, "distill": distill}.items()}
    # the context's text stays out of the prompt, which is shared and stored (a confidential system prompt shipped
    # inside it, and `store show` printed it): the task record has its token count and sha256
    train_cfg["distill"]["context"] = None
    if derived and hasattr(method.config, "init_text"):  # nor in the method's config, which needs a text there
        method.config = dataclasses.replace(method.config,
                                            init_text=f"(the distilled context's first {p} tokens: not recorded)")
    save_prompt(out / "prompt", method, model, task=record, train_config=train_cfg, metrics=report, overwrite=True)
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    print(format_distill_report(report))
    print(f"saved prompt to {out / 'prompt'}  (report: {out / 'distill.json'}, log: {out / 'metrics.jsonl'})")
    if store and not result.diverged:
        PromptStore(store, create=True).add(store_task, out / "prompt", overwrite=True)
        print(f"added to store {store} as task {store_task!r}")
    return report


def format_distill_report(report: dict) -> str:
    """The report as a small table: one row per student, against the teacher on the held-out inputs."""
    lines = [f"held-out inputs: {report['held_out_inputs']}; greedy: {report['max_new_tokens']} tokens",
             f"{'':26} {'KL(teacher||.)':>14} {'greedy exact':>12} {'greedy tokens':>13}"]
    for name, m in report["held_out"].items():
        lines.append(f"{name:26} {m['kl']:14.4f} {m['greedy_exact']:12.3f} {m['greedy_token']:13.3f}")
    lines.append(f"tokens saved per request: {report['tokens_saved_per_request']} "
                 f"(context {report['context_tokens']} - prompt {report['num_virtual_tokens']})")
    return "\n".join(lines)
