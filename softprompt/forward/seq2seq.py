"""Encoder-decoder language models (T5 family): the prompt goes in front of the encoder input, as in the paper.

The encoder attends in both directions, so the prompt's states depend on the text: there is nothing to
cache, and the prompt is kept as its ``(P, H)`` embeddings. The source (after the prompt) is the encoder
input and the target the decoder labels. The mixed-batch engine does not serve this family (its cached
prompt keys/values need a causal model); evaluation and generation run here row by row.
"""

from __future__ import annotations

import weakref

import torch

from softprompt.data import encode, is_chat, label_room, trailing_special_ids
from softprompt.forward.common import (
    Decoded,
    InjectionError,
    RowSampling,
    cached_call,
    check_pass,
    check_prompt,
    id_set,
    label_token_ids,
    out_cache,
    probe_ids,
    prompt_embeds,
    rows_per_label,
)
from softprompt.forward.family import Family, FamilyError
from softprompt.forward.prompt import PromptOutput


def encoder_prompt(model, prompt: PromptOutput | torch.Tensor | None) -> torch.Tensor | None:
    """The checked ``(P, H)`` embeddings that go in front of the encoder input (None: no prompt)."""
    if prompt is None or (isinstance(prompt, PromptOutput) and prompt.kv is None and prompt.embeds is None):
        return None
    if isinstance(prompt, PromptOutput) and prompt.kv is not None:
        raise InjectionError(f"{type(model).__name__} is an encoder-decoder: a key/value prefix needs a decoder-only "
                             "model's cache; use a prompt of embeddings (prompt_tuning, p_tuning)")
    embeds = prompt_embeds(prompt)
    check_prompt(model, embeds)
    return embeds


_SCALES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def encoder_embed_scale(model) -> float:
    """The factor the encoder applies to its embedding module's output when given token ids, and not when given
    ``inputs_embeds`` (Marian, Pegasus, MVP, BlenderbotSmall: ``embed_tokens(ids) * embed_scale`` in the
    forward; 1 for T5 and BART, whose module itself scales). Found once per model by comparing the encoder on
    ids with the encoder on the module's output (scaled by its ``embed_scale``, if it has one).

    Raises:
        InjectionError: neither reproduces what the encoder computes from ids, or it takes no embeddings (FSMT).
    """
    if model in _SCALES:
        return _SCALES[model]
    encoder = model.get_encoder()
    was = encoder.training
    encoder.eval()  # no dropout in the comparison
    try:
        ids = probe_ids(model)  # (1, 3)
        want = encoder(input_ids=ids).last_hidden_state
        emb = model.get_input_embeddings()(ids)
        scale = None
        for s in (1.0, getattr(encoder, "embed_scale", None)):
            if isinstance(s, int | float) and torch.allclose(encoder(inputs_embeds=emb * s).last_hidden_state,
                                                             want, atol=1e-4, rtol=1e-3):
                scale = float(s)
                break
    except Exception as e:  # noqa: BLE001 - an encoder without an embeddings path (FSMT) raises a TypeError
        raise InjectionError(f"{type(model).__name__}'s encoder cannot take a prompt in front of its input: it fails "
                             f"on its embedding module's output ({type(e).__name__}: {e})") from None
    finally:
        encoder.train(was)
    if scale is None:
        raise InjectionError(f"{type(model).__name__}'s encoder computes something else from token ids than from "
                             "its embedding module's output: a prompt cannot be put in front of its input here")
    _SCALES[model] = scale
    return scale


def _at_encoder_scale(model, embeds: torch.Tensor) -> torch.Tensor:
    """``[prompt, text]`` embeddings as the encoder reads ids: the prompt lives in the module's space and is
    scaled with the text (:func:`encoder_embed_scale`)."""
    scale = encoder_embed_scale(model)
    return embeds * scale if scale != 1.0 else embeds


def encoder_inputs(model, batch, embeds: torch.Tensor | None):
    """Encoder ``inputs_embeds`` (prompt + source) and mask, decoder labels, from a source+target batch."""
    b = batch.input_ids.shape[0]
    src_mask = batch.attention_mask.bool() & ~batch.target_mask  # (B, T)
    sources = [batch.input_ids[i][src_mask[i]] for i in range(b)]
    targets = [batch.input_ids[i][batch.target_mask[i]] for i in range(b)]
    s_len, t_len = max(len(x) for x in sources), max(len(x) for x in targets)
    dev = batch.input_ids.device
    enc_ids = torch.zeros(b, s_len, dtype=torch.long, device=dev)
    enc_mask = torch.zeros(b, s_len, dtype=torch.long, device=dev)
    labels = torch.full((b, t_len), -100, dtype=torch.long, device=dev)
    for i in range(b):
        enc_ids[i, :len(sources[i])], enc_mask[i, :len(sources[i])] = sources[i], 1
        labels[i, :len(targets[i])] = targets[i]
    text = model.get_input_embeddings()(enc_ids)  # (B, S, H)
    p = 0 if embeds is None else embeds.shape[0]
    if p:
        text = torch.cat([embeds.to(text)[None].expand(b, -1, -1), text], dim=1)  # (B, P+S, H)
        enc_mask = torch.cat([torch.ones(b, p, dtype=torch.long, device=dev), enc_mask], dim=1)
    return _at_encoder_scale(model, text), enc_mask, labels


def decoder_start(model) -> int:
    """The token the decoder starts from: what ``generate`` starts from (the generation config's
    ``decoder_start_token_id``, else its ``bos_token_id``), for training and scoring too. Passing ``labels=``
    let the model shift them itself, and mBART's and PLBart's shift starts from the last non-pad label token
    (their pre-training's language code), so each candidate label was scored after its own last token.

    Raises:
        InjectionError: the model names no start token.
    """
    for cfg in (getattr(model, "generation_config", None), model.config):
        for key in ("decoder_start_token_id", "bos_token_id"):
            start = getattr(cfg, key, None)
            if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
                return start
    raise InjectionError(f"{type(model).__name__} names no decoder_start_token_id or bos_token_id: the decoder has "
                         "no token to start from")


def decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` decoder input ids for ``labels`` (-100 at padding): the start token, then the labels but the last
    (teacher forcing); padding reads the pad id (causal: it never reaches a real position)."""
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    start = torch.full_like(labels[:, :1], decoder_start(model))
    return torch.cat([start, labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)], dim=1)


def token_logprobs(model, batch, embeds: torch.Tensor | None):
    """Log-probability of every target token ``(B, L)`` (0 at padding) and the mask of real targets."""
    inputs, mask, labels = encoder_inputs(model, batch, embeds)
    logits = model(inputs_embeds=inputs, attention_mask=mask,
                   decoder_input_ids=decoder_inputs(model, labels)).logits.float()  # (B, L, V)
    real = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, L)
    return lp * real, real


def target_loss(model, batch, embeds: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch."""
    lp, real = token_logprobs(model, batch, embeds)
    return -lp.sum() / real.sum()


def target_logprobs(model, batch, embeds: torch.Tensor | None) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens: ``(B,)``."""
    return token_logprobs(model, batch, embeds)[0].sum(-1)


@torch.no_grad()
def greedy(model, text: torch.Tensor, max_new_tokens: int, ends: frozenset[int]) -> tuple[list[int], bool]:
    """Plain greedy decoding of one row from its encoder ``inputs_embeds`` ``(1, S, H)``: the argmax at every step
    from :func:`decoder_start`, nothing else. ``generate`` merged the checkpoint's generation config into any
    config it was given (beams, n-gram blocking, a forced BOS the decoder never saw in training, a forced EOS at
    the last step, minimum lengths, penalties); this loop has none of them. Returns the new tokens before the
    first end id and whether one came."""
    mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    encoded = model.get_encoder()(inputs_embeds=text, attention_mask=mask)
    step = torch.full((1, 1), decoder_start(model), dtype=torch.long, device=text.device)
    past, toks = None, []
    for _ in range(max_new_tokens):
        out = cached_call(model, past, encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=step,
                          use_cache=True)
        past, nxt = out_cache(out), int(out.logits[0, -1].argmax())
        if nxt in ends:
            return toks, True
        toks.append(nxt)
        step = torch.full((1, 1), nxt, dtype=torch.long, device=text.device)
    return toks, False


@torch.no_grad()
def decode(model, input_ids, attention_mask, embeds: torch.Tensor | None, rows: list[RowSampling],
           eos_token_id) -> Decoded:
    """Greedy decoding with the prompt in front of the encoder input (one row at a time)."""
    if len(rows) != input_ids.shape[0]:
        raise InjectionError(f"{len(rows)} sampling settings for a batch of {input_ids.shape[0]} rows")
    if any(r.temperature > 0 for r in rows):
        raise InjectionError("sampling is implemented for decoder-only models; use greedy decoding with T5")
    ends = id_set(eos_token_id)
    out_tokens, finish = [], []
    for i, r in enumerate(rows):
        ids = input_ids[i][attention_mask[i].bool()][None]  # (1, S)
        text = model.get_input_embeddings()(ids)
        if embeds is not None:
            text = torch.cat([embeds.to(text)[None], text], dim=1)
        toks, done = greedy(model, _at_encoder_scale(model, text), r.max_new_tokens, ends)
        out_tokens.append(toks)
        finish.append("eos" if done else "length")
    return Decoded(tokens=out_tokens, finish=finish)


class Seq2SeqLM(Family):
    """An encoder-decoder (``*ForConditionalGeneration``, T5 family): the prompt in front of the encoder."""

    name = "seq2seq_lm"
    peft_task_type = "SEQ_2_SEQ_LM"
    description = "an encoder-decoder"
    served = False
    trails_source = True

    def from_pretrained(self, name_or_path, dtype, num_labels=None):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=dtype)

    def check_model(self, model):
        try:
            encoder_embed_scale(model)
        except InjectionError as e:
            raise FamilyError(f"--task-type seq2seq_lm: {e}") from None

    def format_problem(self, model, fmt):
        if is_chat(fmt):
            return (f"{type(model).__name__} is an encoder-decoder: chat records (messages) train decoder-only "
                    "models, whose chat template writes the whole conversation as one sequence")
        return None

    def trail_ids(self, tokenizer, bos=True):
        # T5 reads every encoder input closed by </s> (pre-training; PEFT users tokenise with it): [P, src, </s>].
        # bos False: a prompt stored before softprompt put it there, trained on [P, src]
        return trailing_special_ids(tokenizer) if bos else []

    def encode_examples(self, tokenizer, examples, fmt, max_length, bos=True):
        # lead_ids is [] here (T5 adds no leading token): the encoder input is the source and its </s>
        return encode(tokenizer, examples, max_length=max_length, append_eos=not fmt.is_classification,
                      lead=self.lead_ids(tokenizer, bos), trail=self.trail_ids(tokenizer, bos),
                      target_room=label_room(tokenizer, fmt))

    def label_lengths(self, tokenizer, fmt):
        return [len(ids) for ids in label_token_ids(tokenizer, fmt)]

    def inference_prompt(self, model, prompt) -> torch.Tensor | None:
        return encoder_prompt(model, prompt)

    def step_prompt(self, model, prompt, mode="auto") -> torch.Tensor | None:
        check_pass(mode)
        return encoder_prompt(model, prompt)  # always the one (concat) pass: there are no keys/values to share

    def loss(self, model, batch, prompt):
        return target_loss(model, batch, prompt)

    def target_logprobs(self, model, batch, prompt):
        return target_logprobs(model, batch, prompt)

    def label_scores(self, model, tokenizer, prompt, examples, fmt, batch_size, max_length=256, bos=True):
        with torch.no_grad():
            return rows_per_label(model, tokenizer, prompt, examples, fmt, batch_size, max_length, target_logprobs,
                                  self.lead_ids(tokenizer, bos), self.trail_ids(tokenizer, bos))

    def decode(self, model, input_ids, attention_mask, prompt, rows, eos_token_id, should_stop=None):
        return decode(model, input_ids, attention_mask, prompt, rows, eos_token_id)
