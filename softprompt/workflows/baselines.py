"""Evaluate a tuned prompt beside the baselines (no prompt, the init text as a hard prompt, k-shot prompting)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from softprompt.data import DataError, Example, TaskData, is_chat, label_room, text_tail, with_leading, with_trailing
from softprompt.data.chat import assistant_spans, chat_prompt_ids, with_shots, with_system
from softprompt.engine import Engine
from softprompt.evaluate import (
    evaluate_on_engine,
    evaluate_prompt,
    hard_prompt_kv,
    k_shot_examples,
    lead_prompt_kv,
    shots_text,
)
from softprompt.forward import family_of
from softprompt.methods import PromptOutput
from softprompt.model import context_length

log = logging.getLogger("softprompt")


def classifier_baselines(model, tokenizer, task: TaskData, args: dict, examples: list[Example],
                         tuned) -> dict:
    """A sequence classifier's report: the tuned prompt with its head, and the head without the prompt.

    Hard-prompt and k-shot baselines rank label words with an LM head, which an encoder classifier lacks.

    Args:
        model: the frozen sequence classifier.
        tokenizer: its tokenizer.
        task: the task (``task.format`` scores the examples).
        args: resolved sections (``eval`` and ``data`` are used).
        examples: the examples to evaluate on.
        tuned: the tuned prompt, as ``compute_prompt_kv`` returns it (its ``head`` is the trained
            classification head).

    Returns:
        Metrics per condition name, in report order.
    """
    ev, data = args["eval"], args["data"]
    skipped = [b for b in ev.baselines if b != "no_prompt"]
    if skipped:
        log.info("baselines %s need an LM head; %s has a classification head: skipped", ", ".join(skipped),
                 type(model).__name__)
    conditions = {"tuned head, no prompt": PromptOutput(head=tuned.head)} if "no_prompt" in ev.baselines else {}
    conditions["tuned soft prompt"] = tuned
    return {name: evaluate_prompt(model, tokenizer, prompt, examples, task.format, ev.eval_batch_size,
                                  max_length=data.max_length)[0] for name, prompt in conditions.items()}


def lm_baselines(model, tokenizer, args: dict, prompt_text: str, examples: list[Example], kv_tuned,
                 fmt) -> dict:
    """The LM objective's report: held-out perplexity of the base model alone, of the init text as a hard
    prompt and of the tuned prompt, all on the same tokens (every token after the first of each chunk).

    Each reads the chunk after what it is: the base model after its BOS, as in pre-training ([BOS, text];
    without it a Gemma or Llama is far off its distribution and its perplexity overstated), the hard prompt
    after [BOS, hint], the tuned prompt after its virtual tokens, as it was trained ([P, text]).

    k-shot prompting has no meaning for plain text and is skipped.
    """
    ev, data = args["eval"], args["data"]
    conditions: dict[str, object] = {}
    if "no_prompt" in ev.baselines:  # [BOS, text] as in pre-training (a tokenizer without a BOS: [text])
        conditions["base model (no prompt)"] = lead_prompt_kv(model, tokenizer)
    if "hard_prompt" in ev.baselines and prompt_text.strip():  # [BOS, hint, text]
        hard = hard_prompt_kv(model, tokenizer, prompt_text.strip() + "\n")
        context = context_length(model.config)
        if context and hard.length + data.max_length > context[0]:  # the chunks are not cut to fit behind it
            log.warning("--objective lm: the init text as a hard prompt is %d tokens; with --max-length %d it "
                        "passes the model's %d positions: that row is skipped (a shorter --init-text or "
                        "--max-length keeps it)", hard.length, data.max_length, context[0])
        else:
            conditions["init text as hard prompt"] = hard
    if kv_tuned is not None:
        conditions["tuned soft prompt"] = kv_tuned
    if "k_shot" in ev.baselines:
        log.info("--objective lm: the k-shot baseline does not apply to plain text: skipped")
    t0 = time.perf_counter()
    report = {name: evaluate_prompt(model, tokenizer, kv, examples, fmt, ev.eval_batch_size,
                                    max_length=data.max_length)[0] for name, kv in conditions.items()}
    log.info("evaluated %d conditions x %d documents in %.1fs", len(conditions), len(examples),
             time.perf_counter() - t0)
    return report


def warn_answer_limits(tokenizer, examples: list[Example], max_new_tokens: int, newline_stops: bool) -> None:
    """Warn about reference answers the greedy answer can never match: longer than ``max_new_tokens``, or
    spanning lines when generation stops at the first newline (a template task's). Their exact match is 0
    and their F1 and ROUGE-L are capped, whatever the prompt."""
    targets = [ex.target.strip() for ex in examples]
    lengths = [len(ids) for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]] if targets else []
    long = sum(n > max_new_tokens for n in lengths)
    if long:
        log.warning("%d of the %d reference answers are longer than --max-new-tokens %d (the longest: %d tokens): "
                    "the greedy answer is cut there, so their exact match is 0 and their F1/ROUGE-L capped; raise "
                    "--max-new-tokens", long, len(targets), max_new_tokens, max(lengths))
    lines = sum("\n" in t for t in targets) if newline_stops else 0
    if lines:
        log.warning("%d of the %d reference answers span lines, and the greedy answer stops at its first newline: "
                    "their exact match is 0 and their F1/ROUGE-L capped", lines, len(targets))


def context_tokens(model, tokenizer, text: str) -> int:
    """Positions ``text`` takes as a hard prompt (:func:`~softprompt.evaluate.hard_prompt_kv`: the BOS opens it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(with_leading(ids, family_of(model).lead_ids(tokenizer, True)))


def context_room(model, tokenizer, fmt, args: dict, examples: list[Example], bos: bool) -> int | None:
    """Positions a hard-prompt or k-shot context may take: the model's, less what the longest example takes
    after it (its source cut at ``--max-length``, as the engine reads it, with the longest label; or with its
    answer and EOS when scored, ``--max-new-tokens`` when generated). ``None``: a model without a position
    limit. ``bos``: the text after the context starts with the model's BOS."""
    context = context_length(model.config)
    if context is None or not examples:
        return None
    ev, data, family = args["eval"], args["data"], family_of(model)
    lead, trail = family.lead_ids(tokenizer, bos), family.trail_ids(tokenizer, bos)
    sources = [len(with_trailing(with_leading(ids, lead), trail))
               for ids in tokenizer([ex.source for ex in examples], add_special_tokens=False)["input_ids"]]
    if fmt.is_classification:
        need = min(max(sources) + label_room(tokenizer, fmt), data.max_length)
    else:
        eos = int(tokenizer.eos_token_id is not None)  # every scored answer ends with it, as in training
        targets = [len(ids) + eos for ids in tokenizer([ex.target for ex in examples],
                                                       add_special_tokens=False)["input_ids"]]
        need = max(min(max(sources), data.max_length) + ev.max_new_tokens,
                   max(min(s + t, data.max_length) for s, t in zip(sources, targets, strict=True)))
    return context[0] - need


def k_shot_context(model, tokenizer, task: TaskData, args: dict, room: int | None) -> tuple[int, str] | None:
    """The k-shot baseline's context: ``--k-shot`` training examples, each source cut as training cut it (its
    end, within ``--max-length``), and fewer of them when they take more than ``room`` positions (a warning
    says so). Returns ``(shots, text)``, or ``None`` (warned) when not even one shot fits."""
    ev, data, fmt, family = args["eval"], args["data"], task.format, family_of(model)
    pool = task.examples("train")
    specials = len(family.lead_ids(tokenizer, True)) + len(family.trail_ids(tokenizer, True))

    def shots(k: int) -> str:
        chosen = k_shot_examples(pool, fmt, k, seed=data.data_seed)
        encoded = family.encode_examples(tokenizer, chosen, fmt, data.max_length)  # as training encodes them
        return shots_text([replace(ex, source=text_tail(tokenizer, ex.source, enc.target_start - specials))
                           for ex, enc in zip(chosen, encoded, strict=True)])

    k = min(ev.k_shot, len(pool))
    text = shots(k)
    if room is None:
        return k, text
    taken = context_tokens(model, tokenizer, text)
    if taken <= room:
        return k, text
    fits, over = 0, k  # the most shots that fit (k drawn hold the k - 1 drawn: fewer take fewer tokens)
    while fits + 1 < over:
        mid = (fits + over) // 2
        fits, over = (mid, over) if context_tokens(model, tokenizer, shots(mid)) <= room else (fits, mid)
    log.warning("--k-shot %d: the %d shots take %d tokens (each cut to --max-length %d); beside the longest "
                "evaluated example %d fit in the model's %d positions: %s (a lower --k-shot or --max-length keeps "
                "every shot)", ev.k_shot, k, taken, data.max_length, max(room, 0),
                context_length(model.config)[0],
                f"the row holds {fits} shot(s)" if fits else "not one shot fits, the row is skipped")
    return (fits, shots(fits)) if fits else None


def evaluate_with_baselines(model, tokenizer, task: TaskData, args: dict, prompt_text: str,
                            examples: list[Example], kv_tuned=None, tuned_bos: bool = True) -> dict:
    """Evaluate the tuned prompt (if given) and the requested baselines on ``examples``.

    Every condition is a task of one :class:`Engine` (the hard-prompt and k-shot contexts become cached
    keys/values like a soft prompt), so all of them run in shared, length-sorted batches. An
    encoder-decoder, which the engine does not serve, is evaluated condition by condition.

    Args:
        model: the frozen base model.
        tokenizer: its tokenizer.
        task: the task (its ``train`` split gives the k-shot examples).
        args: resolved sections (``eval`` and ``data`` are used).
        prompt_text: the hard-prompt baseline's text (the tuned prompt's init text; blank: no such baseline).
        examples: the examples to evaluate on.
        kv_tuned: the tuned prompt's keys/values, as ``compute_prompt_kv`` returns them (``None``: baselines
            only).
        tuned_bos: the tuned prompt's text starts with the model's BOS (its stored layout,
            ``StoredPrompt.bos``; True for a prompt trained now).

    Returns:
        Metrics per condition name, in report order (the tuned prompt last, as ``"tuned soft prompt"``).
    """
    ev, data, fmt = args["eval"], args["data"], task.format
    family = family_of(model)
    if fmt.objective == "lm":
        return lm_baselines(model, tokenizer, args, prompt_text, examples, kv_tuned, fmt)
    if family.has_head:
        return classifier_baselines(model, tokenizer, task, args, examples, kv_tuned)
    if "k_shot" in ev.baselines and not task.splits.get("train"):  # eval --prompt DIR --test-file F, say
        log.warning("the k-shot baseline draws its shots from the train split, and the data evaluated has none: "
                    "skipped (give --train-file to have it)")
    if not fmt.is_classification:  # a free-text answer: greedy, cut at --max-new-tokens (and a template's at "\n")
        warn_answer_limits(tokenizer, examples, ev.max_new_tokens, newline_stops=not is_chat(fmt))
    if is_chat(fmt):
        return chat_baselines(model, tokenizer, task, args, prompt_text, examples, kv_tuned)
    # condition -> (prompt, whether the text after it starts with the model's BOS); each is laid out as the
    # model expects (see softprompt.evaluate): no prompt [BOS, text]; a hard prompt or k-shot context is text
    # read first, so the BOS opens it and the text gets none: [BOS, hard, text]; the soft prompt [P, BOS, text].
    # A model whose text has no leading special token (T5: [src, </s>]) keeps its layout after a context.
    after_context = not family.lead_ids(tokenizer, True)
    conditions: dict[str, tuple[object, bool]] = {}
    if "no_prompt" in ev.baselines:
        conditions["no soft prompt (template only)"] = (None, True)
    # a context and the longest example after it must fit the model's positions (else an IndexError on learned
    # positions, or rows cut shorter than the other conditions' rows)
    room = (context_room(model, tokenizer, fmt, args, examples, after_context)
            if {"hard_prompt", "k_shot"} & set(ev.baselines) else None)
    if "hard_prompt" in ev.baselines and prompt_text.strip():
        text = prompt_text.strip() + "\n"
        taken = context_tokens(model, tokenizer, text) if room is not None else 0
        if room is None or taken <= room:
            conditions["init text as hard prompt"] = (hard_prompt_kv(model, tokenizer, text), after_context)
        else:
            log.warning("the init text as a hard prompt is %d tokens; beside the longest evaluated example, %d "
                        "fit in the model's positions: that row is skipped (a shorter --init-text or --max-length "
                        "keeps it)", taken, room)
    if "k_shot" in ev.baselines and task.splits.get("train"):
        shots = k_shot_context(model, tokenizer, task, args, room)
        if shots is not None:  # the row is named for the shots it holds
            conditions[f"{shots[0]}-shot prompting"] = (hard_prompt_kv(model, tokenizer, shots[1]), after_context)
    if kv_tuned is not None:
        conditions["tuned soft prompt"] = (kv_tuned, tuned_bos)
    t0 = time.perf_counter()
    if not family.served:
        report = {name: evaluate_prompt(model, tokenizer, kv, examples, fmt, ev.eval_batch_size, ev.max_new_tokens,
                                        data.max_length, bos=bos)[0] for name, (kv, bos) in conditions.items()}
    else:
        engine = Engine(model, tokenizer, max_batch_rows=ev.eval_batch_size, max_input_tokens=data.max_length,
                        truncate=True, progress=True)
        runs = {}
        for i, (name, (kv, bos)) in enumerate(conditions.items()):
            task_name = f"condition{i}"
            (engine.add_base(task_name, fmt) if kv is None else engine.add_kv(task_name, kv, fmt, bos=bos))
            runs[name] = task_name
        report = evaluate_on_engine(engine, runs, examples, fmt, ev.max_new_tokens)
    log.info("evaluated %d conditions x %d examples in %.1fs", len(conditions), len(examples),
             time.perf_counter() - t0)
    return report


SAMPLES = 3  # sample replies per condition in a chat report


def _added_tokens(model, tokenizer, fmt, examples: list, augmented: list, max_length: int, max_new_tokens: int,
                  name: str) -> int:
    """Room beyond ``--max-length`` for the turns a baseline adds to each conversation (a system prompt,
    k-shot exchanges), as a template task's hard prompt and k-shot context take none of it: cut to the
    conversation's length, the shots and the template's BOS were dropped and the row still said "4-shot".
    Capped by the model's positions (then said in the log)."""
    if augmented is examples:
        return 0
    extra = max(len(chat_prompt_ids(tokenizer, a.messages, fmt.chat_template))
                - len(chat_prompt_ids(tokenizer, e.messages, fmt.chat_template))
                for e, a in zip(examples, augmented, strict=True))
    context = context_length(model.config)
    if context and max_length + extra + max_new_tokens > context[0]:
        fit = max(0, context[0] - max_new_tokens - max_length)
        log.warning("%s: the added turns take up to %d tokens; %d fit beside --max-length %d in the model's %d "
                    "positions: longer conversations lose their first turns", name, extra, fit, max_length,
                    context[0])
        extra = fit
    return max(extra, 0)


def refused_turns(tokenizer, fmt, examples: list, augmented: list) -> str | None:
    """Why the chat template refuses a conversation a baseline built (a system turn where Gemma's template
    raises "System role not supported", k-shot exchanges that break Mistral's user/assistant alternation), or
    None when it renders every one as it renders the plain ones: an optional row is then skipped, not fatal."""
    if augmented is examples:
        return None
    for e, a in zip(examples, augmented, strict=True):
        try:
            assistant_spans(tokenizer, a.messages, fmt.chat_template, a.scored_from)
        except DataError as err:
            try:  # a conversation the template refuses on its own is the data's problem, reported as such
                assistant_spans(tokenizer, e.messages, fmt.chat_template, e.scored_from)
            except DataError:
                continue
            return f"the chat template refuses the turns this baseline adds ({err})"
    return None


def chat_baselines(model, tokenizer, task: TaskData, args: dict, prompt_text: str, examples: list[Example],
                   kv_tuned=None) -> dict:
    """A chat task's report: no prompt, the prompt text as a system prompt, k-shot conversations, the tuned prompt.

    Each condition is evaluated by :func:`~softprompt.evaluate.evaluate_chat` (loss over the assistant turns,
    greedy reply to the last one); its metrics carry ``samples``: the first few replies beside their
    references.

    Args: as :func:`evaluate_with_baselines`.
    """
    ev, data, rng_seed = args["eval"], args["data"], args["data"].data_seed
    conditions: dict[str, tuple] = {}
    if "no_prompt" in ev.baselines:
        conditions["no soft prompt (chat template only)"] = (None, examples)
    if "hard_prompt" in ev.baselines and prompt_text.strip():
        conditions["init text as system prompt"] = (None, [with_system(ex, prompt_text.strip()) for ex in examples])
    if "k_shot" in ev.baselines and task.splits.get("train"):
        import random

        pool = list(task.examples("train"))
        random.Random(rng_seed).shuffle(pool)
        shots = pool[:ev.k_shot]
        conditions[f"{len(shots)}-shot conversations"] = (None, [with_shots(ex, shots) for ex in examples])
    for name, (_, exs) in list(conditions.items()):
        problem = refused_turns(tokenizer, task.format, examples, exs)
        if problem is not None:
            log.warning("%s: %s; that row is skipped", name, problem)
            del conditions[name]
    if kv_tuned is not None:
        conditions["tuned soft prompt"] = (kv_tuned, examples)
    t0 = time.perf_counter()
    report = {}
    for name, (kv, exs) in conditions.items():
        room = data.max_length + _added_tokens(model, tokenizer, task.format, examples, exs, data.max_length,
                                                ev.max_new_tokens, name)
        metrics, preds = evaluate_prompt(model, tokenizer, kv, exs, task.format, ev.eval_batch_size,
                                         ev.max_new_tokens, room)
        samples = [{"conversation": p.source, "expected": p.expected, "predicted": p.predicted}
                   for p in preds[:SAMPLES]]
        report[name] = {**metrics, "samples": samples}
    log.info("evaluated %d chat conditions x %d examples in %.1fs", len(conditions), len(examples),
             time.perf_counter() - t0)
    return report
