"""Request bodies of the HTTP API (pydantic). OpenAI-compatible where OpenAI has the endpoint.

Unknown fields are ignored, as OpenAI clients send fields we have no use for (``user``, ``metadata``...);
OpenAI fields that would change the answer and that we cannot honour with another value than their default
(``n``, ``echo``, ``suffix``, ``logit_bias``, the penalties, a JSON ``response_format``, ``tools``...) are
refused with a 422 naming them, never silently dropped; so are the sampling extensions of vLLM and TGI that
clients send in ``extra_body`` (``repetition_penalty``, ``min_p``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, guided decoding...: :data:`EXTENSIONS`). Numbers and flags are strict: ``true`` is no token
count and ``"8"`` no temperature.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from softprompt.engine.requests import MAX_TOP_LOGPROBS, SEED_RANGE, unencodable


def _encodable(text: str) -> str:
    why = unencodable(text)
    if why:
        raise ValueError(f"text cannot be tokenised: {why}")
    return text


# text that reaches the tokenizer: valid Unicode that has a UTF-8 form (JSON can carry lone surrogates)
Text = Annotated[str, AfterValidator(_encodable)]
Stop = Text | list[Text] | None
Input = Text | dict[str, Text]
# how many of the most likely tokens to list at each new token; strict: ``true`` or ``"5"`` is no count
TopCount = Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """An explicit null is the field left out, as OpenAI reads it (clients send ``"temperature": null`` for
        a setting they leave to the server): the default applies; a required field stays required."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


# sampling settings of other servers (vLLM's extra parameters, TGI's) that change the answer: the values that
# leave it unchanged, the only ones accepted; any other is refused rather than ignored
EXTENSIONS: dict[str, tuple] = {
    "repetition_penalty": (1,), "length_penalty": (1,), "min_p": (0,), "typical_p": (1,), "min_tokens": (0,),
    "ignore_eos": (False,), "stop_token_ids": ([],), "bad_words": ([],), "allowed_token_ids": (),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "use_beam_search": (False,),
    "best_of": (1,), "prompt_logprobs": (), "truncate_prompt_tokens": (), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "logits_processors": (),
}
CHAT_EXTENSIONS: dict[str, tuple] = {
    "modalities": (["text"],), "audio": (), "prediction": (), "tool_choice": ("none",),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "chat_template": (),
    "chat_template_kwargs": ({},), "documents": (),
}


def _refuse_extensions(data, table: dict[str, tuple]):
    if isinstance(data, dict):
        for name, neutral in table.items():
            value = data.get(name)
            if value is not None and not any(type(value) is type(n) and value == n
                                             or isinstance(n, int | float) and not isinstance(n, bool)
                                             and isinstance(value, int | float) and not isinstance(value, bool)
                                             and value == n for n in neutral):
                allowed = " or ".join(repr(n) for n in neutral) if neutral else "null"
                raise ValueError(f"{name} is not supported (only {allowed}); it would change the answer, so it "
                                 "is refused rather than ignored")
    return data


def _unsupported(what: str, value, default) -> None:
    if value != default:
        raise ValueError(f"{what} is not supported (only {default!r}); it would change the answer, so it is "
                         "refused rather than ignored")


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, strict=True,
                                description="a last chunk (choices empty) with the whole request's token usage")


class _Sampling(_Body):
    model: str = Field(min_length=1, description="the task to use (see /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    top_k: int = Field(default=0, ge=0, le=2**31 - 1, strict=True,
                       description="softprompt extension: keep the k most likely tokens")
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], strict=True)
    stop: Stop = None
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, strict=True, description="only 1 is supported")
    # OpenAI fields refused at any other value than their default (see the module)
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _other_servers(cls, data):
        return _refuse_extensions(data, EXTENSIONS)

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        _unsupported("logit_bias", self.logit_bias or None, None)
        _unsupported("presence_penalty", self.presence_penalty or 0, 0)
        _unsupported("frequency_penalty", self.frequency_penalty or 0, 0)
        kind = (self.response_format or {}).get("type", "text")
        _unsupported("response_format type", kind, "text")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    # the list caps are checked on the raw JSON, before the items are validated: a 4 MB list of a million items
    # was validated item by item on the event loop before its length was refused
    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        if not isinstance(v, str | list):  # another type: the field's own validation names it
            return v
        items = [v] if isinstance(v, str) else v
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(description="text (or texts) filled into the task's template")
    raw: bool = Field(default=False, strict=True,
                      description="softprompt extension: send prompt as is, without the template")
    echo: Literal[False] = False
    logprobs: TopCount | None = Field(default=None, description="each new token's log-probability and the k "
                                      f"(0 to {MAX_TOP_LOGPROBS}) most likely tokens at its place")
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1, strict=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 64:
            raise ValueError("prompt lists take 1 to 64 texts")
        return v


class ContentPart(_Body):
    """One part of a chat message's content; only text parts can reach a language model here."""

    type: Literal["text"] = Field(description="only 'text' parts are supported (no images or audio)")
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    # the speaker's name, passed to the chat template as training passes a record's (``m.name``)
    name: Annotated[Text, Field(min_length=1, max_length=256, pattern=r"\S")] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_message(self) -> dict:
        """The message as a chat template reads it: role, text content, and the name when given."""
        out = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    tools: list | None = None  # no tool calling: a request that offers tools is refused, not answered without them
    functions: list | None = None
    logprobs: bool | None = Field(default=None, strict=True, description="each new token's log-probability")
    top_logprobs: TopCount | None = Field(default=None, description="with logprobs: the k (0 to "
                                          f"{MAX_TOP_LOGPROBS}) most likely tokens at each new token's place")

    @model_validator(mode="before")
    @classmethod
    def _chat_extensions(cls, data):
        return _refuse_extensions(data, CHAT_EXTENSIONS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        _unsupported("tools", self.tools or None, None)
        _unsupported("functions", self.functions or None, None)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_count(self) -> int | None:
        """The engine's ``logprobs``: None when not asked, else how many top tokens to list."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyBody(_Body):
    model: str = Field(min_length=1)
    input: Input | list[Input]
    raw: bool = Field(default=False, strict=True)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 256:
            raise ValueError("input lists take 1 to 256 items")
        return v

    def items(self) -> list[str | dict[str, str]]:
        return v if isinstance(v := self.input, list) else [v]


class ScoreBody(_Body):
    model: str = Field(min_length=1)
    input: Input
    continuation: Text = Field(min_length=1)
    raw: bool = Field(default=False, strict=True)
    eos: bool = Field(default=False, strict=True,
                      description="score the continuation followed by the tokenizer's EOS (the answer ends there)")
