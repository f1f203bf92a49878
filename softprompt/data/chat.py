"""Chat-format tasks: OpenAI-style ``messages`` records rendered with the model's own chat template.

A record ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` is one
conversation. It is rendered with ``tokenizer.apply_chat_template`` (or a ``--chat-template`` file) and the
loss covers the tokens of every assistant turn (but one with ``"weight": 0``, OpenAI's fine-tuning format for a
turn that is context only), found by rendering prefixes: for assistant message ``k``,
the conversation before it with the generation prompt, then the conversation up to and including it; the
tokens between the two are that turn's target (its text and the template's end-of-turn marker). Each
rendered prefix must tokenise to a prefix of the whole conversation's tokens; a template for which it does
not (one that rewrites earlier turns, say) is refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.data.formats import DataError
from softprompt.data.template import Example, TaskFormat, example_name

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")  # ``weight`` (0 or 1) is ours: never passed to the template
_KEY_HINTS = {"tool_calls": "tool calls are not supported", "function_call": "tool calls are not supported",
              "tool_call_id": "tool turns are not supported", "from": "ShareGPT's from/value: write role/content",
              "value": "ShareGPT's from/value: write role/content"}
MESSAGES_FIELD = "messages"
CHAT_INIT_TEXT = "You are a helpful assistant. Answer the user."


@dataclass
class ChatExample(Example):
    """One conversation. ``source``/``target`` hold a plain-text view (the turns before the last assistant
    turn, and that turn's content) for code that only counts words; training and evaluation use ``messages``.

    Attributes:
        messages: the validated messages (``role``, ``content``, and ``name`` and ``weight`` when given).
        scored_from: assistant turns before this message index are context, not target (k-shot shots).
    """

    messages: list[dict] = field(default_factory=list)
    scored_from: int = 0

    @property
    def last_assistant(self) -> int:
        """Index of the last trained assistant message (not ``"weight": 0``; -1 when there is none)."""
        return last_trained(self.messages)


def trained(message: dict) -> bool:
    """Whether a message is a target: an assistant turn without ``"weight": 0``."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def last_trained(messages: list[dict]) -> int:
    """Index of the last trained assistant message (-1 when there is none)."""
    return max((i for i, m in enumerate(messages) if trained(m)), default=-1)


def parse_messages(messages, where: str = "", require_assistant: bool = True) -> list[dict]:
    """Validate a conversation: a non-empty list of ``{"role", "content"}`` with known roles and string content,
    and optionally ``name`` (a non-empty string, passed to the chat template) and ``weight`` (0 or 1, on an
    assistant message: 0 makes it context, not a target, as in OpenAI's fine-tuning format). Any other key is
    refused, not dropped (a tool call dropped in silence would train on the turn without it).

    Args:
        messages: the ``messages`` value of a record or request.
        where: location for the message, e.g. ``"train.jsonl line 7"``.
        require_assistant: refuse a conversation without an assistant turn (training and evaluation need one).

    Returns:
        The messages with those keys only.

    Raises:
        DataError: naming ``where`` and every problem found.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(messages, list):
        raise DataError(f"{prefix}field 'messages' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{prefix}empty conversation (field 'messages' has no messages)")
    problems: list[str] = []
    out: list[dict] = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            problems.append(f"message {i} must be an object with role and content, got {type(m).__name__}")
            continue
        role, content = m.get("role"), m.get("content")
        for key in m:
            if key not in MESSAGE_KEYS:
                hint = f" ({_KEY_HINTS[key]})" if key in _KEY_HINTS else ""
                problems.append(f"message {i} has key {key!r}, which is not read{hint}; a message takes "
                                f"{', '.join(MESSAGE_KEYS)}")
        if role not in ROLES:
            problems.append(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"message {i} content must be a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip():  # its loss would be the end-of-turn marker alone
            problems.append(f"message {i} is an assistant turn with no content (nothing to learn or to score)")
        msg = {"role": role, "content": content}
        if "name" in m:
            if not isinstance(m["name"], str) or not m["name"].strip():
                problems.append(f"message {i} name must be a non-empty string, got {m['name']!r}")
            msg["name"] = m["name"]
        if "weight" in m:
            w = m["weight"]
            if isinstance(w, bool) or not isinstance(w, int | float) or w not in (0, 1):
                problems.append(f"message {i} weight must be 0 (not trained on) or 1, got {w!r}")
            elif role != "assistant":
                problems.append(f"message {i} has a weight, which only an assistant message takes")
            else:
                msg["weight"] = int(w)
        out.append(msg)
    if not problems and require_assistant and not any(m["role"] == "assistant" for m in out):
        problems.append("no assistant message (the loss covers assistant turns: a record needs at least one)")
    elif not problems and require_assistant and last_trained(out) < 0:
        problems.append("every assistant message has weight 0 (nothing to train on or to score)")
    if problems:
        raise DataError(prefix + "; ".join(problems))
    return out


def is_chat_record(record: dict) -> bool:
    """True when a record holds a ``messages`` list (a chat record)."""
    return isinstance(record, dict) and isinstance(record.get(MESSAGES_FIELD), list)


def is_chat(fmt) -> bool:
    """True for a :class:`ChatFormat`."""
    return isinstance(fmt, ChatFormat)


def bos_after_prompt(fmt) -> bool:
    """Whether a prompt trained on tasks of format ``fmt`` reads the model's BOS between itself and the text
    (``[P, BOS, text]``, PEFT's layout; what a stored prompt's ``bos`` records): not for plain-text LM
    training (a corpus chunk right after the prompt) nor for a chat task (the conversation as its template
    renders it, with the template's own special tokens)."""
    return fmt.objective != "lm" and not is_chat(fmt)


@dataclass
class ChatFormat(TaskFormat):
    """A chat task: records hold ``messages``; the model's chat template (or ``chat_template``) renders them.

    It is a :class:`TaskFormat` without a template or verbalizer (a generation task), so code that asks a
    format for its labels works unchanged.

    Attributes:
        chat_template: a Jinja chat template replacing the tokenizer's own (``--chat-template FILE``).
    """

    template: str | None = None
    target_field: str = MESSAGES_FIELD
    verbalizer: dict[str, str] | None = None
    target_prefix: str = ""
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.template is not None or self.verbalizer is not None:
            raise DataError("a chat task takes no --template or --verbalizer (its records hold messages)")
        if self.chat_template is not None and (not isinstance(self.chat_template, str)
                                               or not self.chat_template.strip()):
            raise DataError("--chat-template must be a non-empty Jinja template")

    @property
    def fields(self) -> list[str]:
        return []

    def render(self, record: dict, where: str = "") -> ChatExample:
        """Validate one record's conversation (it needs an assistant turn)."""
        prefix = f"{where}: " if where else ""
        if not isinstance(record, dict) or MESSAGES_FIELD not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{prefix}field 'messages' is missing (have: {keys or 'no fields'})")
        messages = parse_messages(record[MESSAGES_FIELD], where)
        last = last_trained(messages)
        source = "\n".join(m["content"] for m in messages[:last])
        return ChatExample(source, messages[last]["content"], None, messages, origin=where or None)


def _model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def render_chat(tokenizer, messages: list[dict], chat_template: str | None = None,
                add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it.

    Raises:
        DataError: the tokenizer has no chat template and none is given, or the template fails.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer of {_model_name(tokenizer)} has no chat template, so it cannot render "
                        "chat records: pass --chat-template FILE (a Jinja chat template) or use a chat model")
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # ours, not the template's
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a Jinja template may raise anything (raise_exception, TypeError...)
        raise DataError(f"the chat template of {_model_name(tokenizer)} cannot render this conversation "
                        f"({type(e).__name__}: {e})") from None


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes its own special tokens (BOS, turn markers) as text: add none
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation followed by the generation prompt (what the assistant's reply continues)."""
    return _ids(tokenizer, render_chat(tokenizer, messages, chat_template, add_generation_prompt=True))


def assistant_spans(tokenizer, messages: list[dict], chat_template: str | None = None,
                    scored_from: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the ``[start, end)`` token span of every assistant turn.

    Args:
        scored_from: assistant messages before this index get no span (context turns).

    Raises:
        DataError: the template renders a prefix of the conversation as something that is not a prefix of
            the whole conversation's tokens (the turns cannot be told apart reliably).
    """
    full = _ids(tokenizer, render_chat(tokenizer, messages, chat_template))
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if not trained(m) or k < scored_from:
            continue
        before_text = render_chat(tokenizer, messages[:k], chat_template, add_generation_prompt=True)
        upto_text = render_chat(tokenizer, messages[:k + 1], chat_template)
        before, upto = _ids(tokenizer, before_text), _ids(tokenizer, upto_text)
        if upto == full[:len(upto)] and before != upto[:len(before)] and upto_text.startswith(before_text):
            # the text continues the generation prompt but its tokens do not: the reply's first characters merge
            # with the prompt's last token (Qwen2's BPE writes "\n" + "\n" as one token), so no reply generated
            # after that prompt is tokenised this way; training on it would teach what inference never reads
            raise DataError(f"assistant turn {k + 1} starts with {upto_text[len(before_text):][:12]!r}, which the "
                            f"tokenizer of {_model_name(tokenizer)} merges with the end of the generation prompt "
                            f"({before_text[-12:]!r}) into other tokens: a reply generated after that prompt never "
                            "starts so; strip the reply's leading whitespace")
        if upto != full[:len(upto)] or before != upto[:len(before)] or len(before) >= len(upto):
            raise DataError(f"the chat template of {_model_name(tokenizer)} does not render assistant turn "
                            f"{k + 1} as a prefix of the whole conversation (it rewrites earlier turns or the "
                            "generation prompt); the assistant tokens cannot be located: pass --chat-template "
                            "FILE with a template that renders conversations incrementally")
        spans.append((len(before), len(upto)))
    return full, spans


_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello to you."}]


def _turn_tail(tokenizer, chat_template: str | None) -> str | None:
    """What the chat template writes after an assistant turn's text (its end of turn), or None."""
    try:
        text = render_chat(tokenizer, _PROBE, chat_template)
    except DataError:
        return None
    at = text.rfind(_PROBE[-1]["content"])
    return None if at < 0 else text[at + len(_PROBE[-1]["content"]):]


def turn_end_text(tokenizer, chat_template: str | None = None) -> str | None:
    """The text the chat template ends an assistant turn with, when no special token does (ChatML's
    ``<|im_end|>`` on a tokenizer without that token: a frozen base model learns to write it as text): a stop
    string for a chat task's generation. None when the turn ends with a special token
    (:func:`turn_end_ids`) or with nothing but whitespace."""
    tail = _turn_tail(tokenizer, chat_template)
    if tail is None or turn_end_ids(tokenizer, chat_template):
        return None
    return tail.strip() or None


def turn_end_ids(tokenizer, chat_template: str | None = None) -> tuple[int, ...]:
    """The special token(s) the chat template ends an assistant turn with (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``, Mistral's ``</s>``): what a chat prompt learned to emit at the end of its answer (the
    turn's tokens are its target, :func:`assistant_spans`), and so what must end its generation even when
    the model's EOS is another token (ChatML on a base model). Found by rendering a short conversation: the
    special tokens between the reply's text and the next non-space text. Empty when the template ends a turn
    with plain text or nothing, or cannot render the probe."""
    tail = _turn_tail(tokenizer, chat_template)
    if tail is None:
        return ()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out = []
    for i in _ids(tokenizer, tail):
        if i in special:
            out.append(int(i))
        elif tokenizer.decode([i]).strip():  # the next turn's text: the end markers are behind
            break
    return tuple(dict.fromkeys(out))


def check_turn_end(tokenizer, chat_template: str | None = None) -> None:
    """Refuse a chat template that ends an assistant turn with nothing but whitespace (Alpaca's
    ``### Response: ...\n``): the prompt would learn no end of its answer and generation (evaluation,
    ``generate``, the server) would run to its token limit inventing turns. Writing the model's EOS after the
    reply fixes it in training and serving alike (both render the conversation with the same template).

    Raises:
        DataError: naming the model and the fix.
    """
    tail = _turn_tail(tokenizer, chat_template)
    if tail is None or tail.strip() or turn_end_ids(tokenizer, chat_template):
        return
    eos = getattr(tokenizer, "eos_token", None)
    raise DataError(f"the chat template of {_model_name(tokenizer)} ends an assistant turn with "
                    f"{'nothing' if not tail else 'whitespace only'}: a prompt trained on it learns no end of its "
                    "answer and generation runs to --max-new-tokens; end assistant turns with the EOS "
                    f"({{{{ eos_token }}}}{f', {eos!r}' if eos else ''}) in a --chat-template FILE")


def lead_kept(tokenizer, ids: list[int], max_length: int) -> int:
    """How many leading ids a cut of a rendered conversation keeps: the BOS its template wrote (Llama 3's
    ``<|begin_of_text|>``, Gemma's ``<bos>``), as a template task keeps its leading special ids; the cut takes
    the tokens after it. None when that leaves no room for text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    n = next((i for i, t in enumerate(ids) if t != bos), len(ids)) if bos is not None else 0
    return n if n < max_length else 0


def keep_end(tokenizer, ids: list[int], max_length: int) -> list[int]:
    """A rendered conversation within ``max_length`` tokens as training cuts it: its leading BOS
    (:func:`lead_kept`), then its last tokens."""
    if len(ids) <= max_length:
        return ids
    lead = lead_kept(tokenizer, ids, max_length)
    return ids[:lead] + ids[len(ids) - (max_length - lead):]


def encode_chat(tokenizer, examples: list[ChatExample], fmt: ChatFormat, max_length: int = 256) -> list:
    """Tokenise conversations with a per-token target mask over their assistant turns.

    A conversation over ``max_length`` tokens loses tokens from the start, after its BOS (:func:`keep_end`); an
    assistant turn the cut reaches is no target (its tail, without the turns before it); one left with no
    whole assistant turn is refused.

    Returns:
        One :class:`~softprompt.data.tokenize.Encoded` per example, ``target_mask`` set and ``target_start``
        at its first target token.

    Raises:
        DataError: no chat template, a template that is not incremental or ends an assistant turn with
            whitespace only (:func:`check_turn_end`), or too long a conversation.
    """
    from softprompt.data.tokenize import Encoded

    if max_length < 1:
        raise DataError(f"--max-length must be >= 1, got {max_length}")
    check_turn_end(tokenizer, fmt.chat_template)
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, ChatExample):
            raise DataError(f"{example_name(ex, i)}: a chat task needs chat examples (records with messages)")
        try:
            ids, spans = assistant_spans(tokenizer, ex.messages, fmt.chat_template, ex.scored_from)
        except DataError as e:
            raise DataError(f"{example_name(ex, i)}: {e}") from None
        mask = [False] * len(ids)
        for start, end in spans:
            mask[start:end] = [True] * (end - start)
        n = len(ids)
        if n > max_length:
            lead = lead_kept(tokenizer, ids, max_length)
            cut = n - max_length + lead
            for start, end in spans:  # an answer cut at its start is no target: its tail without its question
                if start < cut < end:
                    mask[cut:end] = [False] * (end - cut)
            ids, mask = ids[:lead] + ids[cut:], mask[:lead] + mask[cut:]
        mask[0] = False  # nothing before the first token predicts it (the soft prompt aside)
        if not any(mask):
            raise DataError(f"{example_name(ex, i)}: no whole assistant turn is left within --max-length {max_length} "
                            f"(the conversation has {n} tokens)")
        out.append(Encoded(input_ids=ids, target_start=mask.index(True), target_mask=mask))
    return out


def with_system(example: ChatExample, text: str) -> ChatExample:
    """``example`` with ``text`` as its system prompt: a system turn first, or put before an existing one's
    content (the hard-prompt baseline of a chat task)."""
    messages = [dict(m) for m in example.messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{text}\n\n{messages[0]['content']}"
        shift = 0
    else:
        messages.insert(0, {"role": "system", "content": text})
        shift = 1
    return ChatExample(example.source, example.target, None, messages, example.scored_from + shift,
                       origin=example.origin)


def with_shots(example: ChatExample, shots: list[ChatExample]) -> ChatExample:
    """``example`` after the turns of the ``shots`` conversations (their system turns dropped; the example's
    own system turn stays first); only the example's own assistant turns are scored (k-shot baseline)."""
    head = [dict(m) for m in example.messages[:1] if m["role"] == "system"]
    context = [dict(m) for shot in shots for m in shot.messages if m["role"] != "system"]
    rest = [dict(m) for m in example.messages[len(head):]]
    return ChatExample(example.source, example.target, None, head + context + rest, len(head) + len(context),
                       origin=example.origin)


def conversation_prompt(tokenizer, fmt: TaskFormat | None, messages, where: str = "messages") -> str:
    """The text a served chat task (or the base model, ``fmt`` None) continues as the assistant: the
    conversation so far rendered with the task's chat template and the generation prompt.

    Raises:
        DataError: malformed messages, a task with a ``--template`` (not a chat task), or no chat template.
    """
    msgs = parse_messages(messages, where, require_assistant=False)
    if fmt is not None and not is_chat(fmt):
        raise DataError("this task was trained with a --template, not on chat records: send its input as text")
    return render_chat(tokenizer, msgs, None if fmt is None else fmt.chat_template, add_generation_prompt=True)
