"""Interpretability of stored soft prompts: nearest vocabulary tokens, norms, similarity between prompts.

A prompt-tuning prompt is ``P`` vectors in the base model's input-embedding space, so each virtual token
can be compared with the embeddings of real tokens. That space is the embedding module's output
(:func:`softprompt.embeddings.vocab_embeddings`), which is what the callers pass as ``embedding_matrix``:
on families that scale in the module (Gemma) the raw weight rows are ``sqrt(hidden_size)`` times smaller
than what the model consumes, and norms compared with them would be off by that factor. Trained prompts
usually drift far from every real token (large norms, low cosines to the nearest token, Lester et al. 2021
sec. 7), so the nearest tokens are a hint about what a prompt encodes, not a translation of it.

Only tensors living in token space can be read this way: a ``prompt_embeddings`` tensor of shape
``(P, hidden_size)``. Anything else (e.g. a prefix-tuning prompt of per-layer keys/values) is refused by
:func:`token_space_embeddings` with a ValueError naming the prompt and the shape.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, NamedTuple

import torch

EMBEDDINGS_KEY = "prompt_embeddings"
CHUNK_ROWS = 8192  # vocabulary rows compared per step: a (P, 8192) fp32 block instead of (P, V)
EPS = 1e-12  # floor of a vector norm: a zero vector has cosine 0 with everything instead of NaN
DIGITS = 6  # rounding of the floats in a report

__all__ = ["EMBEDDINGS_KEY", "PromptSimilarity", "format_inspect", "inspect_report", "nearest_tokens",
           "prompt_norms", "prompt_similarity", "token_space_embeddings", "token_text"]


def token_space_embeddings(name: str, tensors: Mapping[str, torch.Tensor], hidden_size: int) -> torch.Tensor:
    """The ``(P, hidden_size)`` embeddings of a stored prompt, if it has any.

    Args:
        name: the prompt's name (task or folder), used in the error message.
        tensors: the prompt's stored tensors (``StoredPrompt.tensors``).
        hidden_size: the base model's embedding width ``H``.

    Returns:
        ``tensors["prompt_embeddings"]``, shape ``(P, H)``.

    Raises:
        ValueError: no ``prompt_embeddings`` tensor, or it is not ``(P, H)``; names the prompt and shape.
    """
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    if EMBEDDINGS_KEY not in tensors:
        raise ValueError(f"{name}: has no {EMBEDDINGS_KEY!r} tensor (tensors: {shapes}); only prompts stored as "
                         f"token embeddings of shape (P, {hidden_size}) can be inspected")
    emb = tensors[EMBEDDINGS_KEY]
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] != hidden_size:
        raise ValueError(f"{name}: {EMBEDDINGS_KEY!r} has shape {tuple(emb.shape)}, not (P, {hidden_size}): it is "
                         f"not in the model's token-embedding space (hidden size {hidden_size}) and cannot be "
                         "compared with vocabulary tokens")
    return emb


def _check_pair(embeds: torch.Tensor, embedding_matrix: torch.Tensor) -> None:
    if embeds.ndim != 2 or embedding_matrix.ndim != 2 or embeds.shape[1] != embedding_matrix.shape[1]:
        raise ValueError(f"expected prompt embeddings (P, H) and an embedding matrix (V, H), got "
                         f"{tuple(embeds.shape)} and {tuple(embedding_matrix.shape)}")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)


def token_text(tokenizer, token_id: int) -> tuple[str, str]:
    """``(token, text)``: the vocabulary entry (e.g. ``"Ġgood"``) and its readable decoding (``" good"``)."""
    token = tokenizer.convert_ids_to_tokens([token_id])[0]
    if token is None:
        token = f"<id {token_id}>"
    return str(token), tokenizer.decode([token_id])


def nearest_tokens(embeds: torch.Tensor, embedding_matrix: torch.Tensor, tokenizer,
                   k: int = 5, chunk_rows: int = CHUNK_ROWS) -> list[list[tuple[str, int, float]]]:
    """The ``k`` vocabulary tokens with the highest cosine similarity to each virtual token.

    Only rows with a token in ``tokenizer`` are candidates: models often pad the embedding matrix beyond
    the tokenizer's vocabulary, and those rows are never an input. The matrix is read ``chunk_rows`` rows
    at a time in fp32, so a 50k x 576 vocabulary never needs a ``(P, V)`` block; equal cosines are ordered
    by token id (lowest first), whatever the chunking.

    Args:
        embeds: prompt embeddings, shape ``(P, H)``.
        embedding_matrix: the model's input embeddings as it consumes them (the embedding module's output
            for every token id), shape ``(V, H)`` (any device and float dtype).
        tokenizer: the model's tokenizer (``convert_ids_to_tokens``, ``__len__``).
        k: tokens per virtual token (fewer when the vocabulary is smaller).
        chunk_rows: vocabulary rows compared per step.

    Returns:
        Per virtual token, ``[(token, token_id, cosine), ...]`` by decreasing cosine; ``token`` is the
        vocabulary entry (see :func:`token_text` for a readable decoding).

    Raises:
        ValueError: ``k`` or ``chunk_rows`` < 1, or the shapes do not match.
    """
    if k < 1 or chunk_rows < 1:
        raise ValueError(f"k and chunk_rows must be >= 1, got k={k}, chunk_rows={chunk_rows}")
    _check_pair(embeds, embedding_matrix)
    vocab = min(int(embedding_matrix.shape[0]), len(tokenizer))
    device = embedding_matrix.device
    query = _unit_rows(embeds.detach().to(device=device, dtype=torch.float32))  # (P, H)
    best_val = query.new_empty(query.shape[0], 0)  # (P, <=k) running top cosines
    best_ids = torch.empty(query.shape[0], 0, dtype=torch.long, device=device)  # (P, <=k)
    for start in range(0, vocab, chunk_rows):
        rows = _unit_rows(embedding_matrix[start:start + chunk_rows][:vocab - start].detach().float())  # (C, H)
        sims = query @ rows.T  # (P, C)
        # a stable descending sort keeps equal cosines in id order; the running best (lower ids) comes first
        val, idx = torch.sort(sims, dim=1, descending=True, stable=True)
        val, ids = torch.cat([best_val, val[:, :k]], 1), torch.cat([best_ids, idx[:, :k] + start], 1)  # (P, <=2k)
        val, order = torch.sort(val, dim=1, descending=True, stable=True)
        best_val, best_ids = val[:, :k], ids.gather(1, order)[:, :k]  # (P, <=k)
    out = []
    for vals, ids in zip(best_val.cpu().tolist(), best_ids.cpu().tolist(), strict=True):
        out.append([(token_text(tokenizer, i)[0], i, float(v)) for v, i in zip(vals, ids, strict=True)])
    return out


def _row_norms(matrix: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """L2 norm of every row in fp32, read in chunks; shape ``(V,)`` on the CPU."""
    parts = [torch.linalg.vector_norm(matrix[s:s + chunk_rows].detach().float(), dim=1).cpu()
             for s in range(0, matrix.shape[0], chunk_rows)]
    return torch.cat(parts)


def prompt_norms(embeds: torch.Tensor, embedding_matrix: torch.Tensor) -> dict[str, Any]:
    """L2 norms of the virtual tokens, next to the vocabulary's for comparison.

    Args:
        embeds: prompt embeddings, shape ``(P, H)``.
        embedding_matrix: the model's input embeddings as it consumes them (the embedding module's output
            for every token id), shape ``(V, H)``.

    Returns:
        ``token_norms`` (list of P floats), their ``mean``/``min``/``max``, the vocabulary rows'
        ``vocab_mean``/``vocab_median`` (median: average of the two middle values when V is even) and
        ``ratio`` = ``mean / vocab_mean`` (how far the prompt sits outside the vocabulary's scale).
    """
    _check_pair(embeds, embedding_matrix)
    norms = torch.linalg.vector_norm(embeds.detach().cpu().float(), dim=1)  # (P,)
    vocab = _row_norms(embedding_matrix)  # (V,)
    vocab_mean = float(vocab.mean())
    return {
        "token_norms": norms.tolist(),
        "mean": float(norms.mean()),
        "min": float(norms.min()),
        "max": float(norms.max()),
        "vocab_mean": vocab_mean,
        "vocab_median": float(torch.quantile(vocab.double(), 0.5)),
        "ratio": float(norms.mean()) / vocab_mean if vocab_mean > 0 else float("inf"),
    }


class PromptSimilarity(NamedTuple):
    """Similarity between prompts, rows and columns in ``names`` order; both matrices are symmetric.

    Attributes:
        names: prompt names.
        pooled: cosine of the mean-pooled prompts (the mean of each prompt's virtual tokens): whether
            the prompts point the same way on average. Shape ``(N, N)``.
        aligned: soft alignment. For prompts A and B, ``A->B`` is the mean over A's virtual tokens of
            the cosine to their best-matching token of B; the entry is ``(A->B + B->A) / 2``. It is 1
            when every token of each prompt has a same-direction token in the other, whatever the order
            and lengths. Shape ``(N, N)``.
    """

    names: list[str]
    pooled: torch.Tensor
    aligned: torch.Tensor


def prompt_similarity(prompts: Mapping[str, torch.Tensor]) -> PromptSimilarity:
    """Similarity between prompts of possibly different lengths (see :class:`PromptSimilarity`).

    Args:
        prompts: name -> embeddings of shape ``(P_i, H)``; ``H`` equal for all.

    Returns:
        ``(names, pooled, aligned)``; matrices are float64 on the CPU, ``(N, N)``.

    Raises:
        ValueError: a prompt is not 2-D with at least one row, or the widths differ (names them).
    """
    names = list(prompts)
    problems = [f"{n}: shape {tuple(t.shape)}" for n, t in prompts.items() if t.ndim != 2 or t.shape[0] < 1]
    if problems:
        raise ValueError("prompts must be (P, H) with P >= 1: " + "; ".join(problems))
    widths = {n: int(t.shape[1]) for n, t in prompts.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"prompts have different widths and cannot be compared: {widths}")
    # prompts are small (P x H): float64 keeps self-similarity at 1 up to ~1e-15
    units = [_unit_rows(prompts[n].detach().cpu().double()) for n in names]  # each (P_i, H)
    pooled = _unit_rows(torch.stack([prompts[n].detach().cpu().double().mean(0) for n in names]))  # (N, H)
    pooled_sim = pooled @ pooled.T  # (N, N)
    aligned = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, a in enumerate(units):
        for j in range(i, len(units)):
            cos = a @ units[j].T  # (P_i, P_j)
            aligned[i, j] = aligned[j, i] = (cos.max(1).values.mean() + cos.max(0).values.mean()) / 2
    return PromptSimilarity(names, (pooled_sim + pooled_sim.T) / 2, aligned)


def _round(x: float) -> float:
    return round(float(x), DIGITS)


def inspect_report(prompts: Mapping[str, torch.Tensor], embedding_matrix: torch.Tensor, tokenizer, k: int = 5,
                   *, model_name: str | None = None, details: Mapping[str, Mapping[str, Any]] | None = None,
                   notes: list[str] | None = None) -> dict[str, Any]:
    """Nearest tokens and norms of every prompt and, for two or more, their similarity matrices.

    Args:
        prompts: name -> embeddings ``(P_i, H)`` (see :func:`token_space_embeddings`).
        embedding_matrix: the model's input embeddings as it consumes them (the embedding module's output
            for every token id), shape ``(V, H)``.
        tokenizer: the model's tokenizer.
        k: nearest tokens per virtual token (at most the vocabulary size; a larger ``k`` is lowered, noted).
        model_name: recorded as ``model``.
        details: name -> extra fields for that prompt's entry (e.g. ``path``, ``method``).
        notes: lines for the reader (e.g. ensembles that were not inspected).

    Returns:
        A JSON-ready dict: ``model``, ``top_k``, ``vocab`` (``size``, ``mean_norm``, ``median_norm``),
        ``prompts`` (per prompt: ``name``, ``num_virtual_tokens``, ``norms``, ``tokens`` with per virtual
        token ``index``, ``norm`` and ``nearest`` ``[{token, text, id, cosine}]``), ``similarity``
        (``names``, ``mean_pooled_cosine``, ``soft_alignment``; ``None`` for a single prompt), ``notes``.
    """
    entries, vocab, notes = [], None, list(notes or [])
    size = min(int(embedding_matrix.shape[0]), len(tokenizer))
    if k > size:  # a table of k columns would be sized by the flag, not by the tokens there are
        notes.append(f"--top-k {k} is more than the {size} vocabulary tokens: all {size} are shown")
        k = size
    for name, emb in prompts.items():
        # the rows a token can be: padding rows past the tokenizer (zeros, or never trained) are never an input
        norms = prompt_norms(emb, embedding_matrix[:size])
        vocab = {"size": size,
                 "mean_norm": _round(norms["vocab_mean"]), "median_norm": _round(norms["vocab_median"])}
        tokens = []
        for i, near in enumerate(nearest_tokens(emb, embedding_matrix, tokenizer, k)):
            tokens.append({"index": i, "norm": _round(norms["token_norms"][i]),
                           "nearest": [{"token": tok, "text": token_text(tokenizer, tid)[1], "id": tid,
                                        "cosine": _round(cos)} for tok, tid, cos in near]})
        summary = {key: _round(norms[key]) for key in ("mean", "min", "max", "ratio")}
        entries.append({"name": name, **dict((details or {}).get(name, {})), "num_virtual_tokens": len(tokens),
                        "norms": summary, "tokens": tokens})
    similarity = None
    if len(prompts) >= 2:
        sim = prompt_similarity(prompts)
        similarity = {"names": sim.names,
                      "mean_pooled_cosine": [[_round(v) for v in row] for row in sim.pooled.tolist()],
                      "soft_alignment": [[_round(v) for v in row] for row in sim.aligned.tolist()]}
    return {"model": model_name, "top_k": k, "vocab": vocab, "prompts": entries, "similarity": similarity,
            "notes": notes}


def _table(rows: list[list[str]], right: Container[int] = (), indent: str = "  ") -> list[str]:
    """Rows of cells as aligned lines (columns in ``right`` right-aligned)."""
    widths = [max(len(r[c]) for r in rows if c < len(r)) for c in range(max(map(len, rows)))]
    return [indent + "  ".join(cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
                               for c, cell in enumerate(r)).rstrip() for r in rows]


def _matrix(title: str, names: list[str], matrix: list[list[float]]) -> list[str]:
    rows = [["", *names], *([n, *(f"{v:.3f}" for v in row)] for n, row in zip(names, matrix, strict=True))]
    return [title, *_table(rows, right=set(range(1, len(names) + 1)))]


def format_inspect(report: Mapping[str, Any]) -> str:
    """Plain-text rendering of :func:`inspect_report`'s dict: aligned tables, one block per prompt."""
    vocab = report.get("vocab") or {}
    lines = [f"model: {report.get('model') or '-'}   vocabulary: {vocab.get('size', '-')} tokens, embedding norm "
             f"mean {vocab.get('mean_norm', 0):.3f}, median {vocab.get('median_norm', 0):.3f}"]
    for p in report["prompts"]:
        n = p["norms"]
        where = f"  {p['path']}" if p.get("path") else ""
        lines += ["", f"prompt {p['name']} ({p['num_virtual_tokens']} virtual tokens){where}",
                  f"  norm mean {n['mean']:.3f}, min {n['min']:.3f}, max {n['max']:.3f} "
                  f"({n['ratio']:.2f}x the vocabulary mean)",
                  f"  nearest vocabulary tokens (cosine), top {report['top_k']}:"]
        rows = [["#", "NORM", *(cell for j in range(report["top_k"]) for cell in (str(j + 1), "cos"))]]
        for t in p["tokens"]:
            # repr shows the whitespace a token carries (' the' vs 'the')
            rows.append([str(t["index"]), f"{t['norm']:.3f}",
                         *(cell for x in t["nearest"] for cell in (repr(x["text"]), f"{x['cosine']:.3f}"))])
        lines += _table(rows, right={0, 1, *range(3, 2 + 2 * report["top_k"], 2)}, indent="    ")
    sim = report.get("similarity")
    if sim:
        lines += ["", *_matrix("similarity: cosine of mean-pooled prompts", sim["names"], sim["mean_pooled_cosine"]),
                  "", *_matrix("similarity: soft alignment (mean best-match token cosine, symmetrised)",
                               sim["names"], sim["soft_alignment"])]
    notes = report.get("notes") or []
    if notes:
        lines += ["", *(f"note: {note}" for note in notes)]
    return "\n".join(lines)
