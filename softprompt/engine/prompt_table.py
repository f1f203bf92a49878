"""Keys/values of many prompts kept together, so one batch can use a different prompt in every row."""

from __future__ import annotations

import torch

from softprompt.forward import InjectionError, PromptKV, RowPrompts


class PromptTable:
    """Keys/values of many prompts kept together, so a batch can gather one prompt per row.

    Each prompt is computed once (:func:`compute_prompt_kv`) and stored left-padded to the longest
    prompt in one ``(N, kv_heads, L_max, head_dim)`` tensor per layer; :meth:`rows` slices the last ``L``
    slots (``L`` = longest prompt in the batch) and indexes the rows' prompts. The key ``None`` means "no
    prompt" (the plain base model) and has length 0. A layer that attends to an earlier layer's keys/values
    (Gemma 3n, Gemma 4 E2B/E4B: :func:`~softprompt.forward.common.shared_kv_sources`) holds the same tensors as
    that layer in every prompt, and the table stores and gathers them once for both.
    """

    def __init__(self):
        self._kv: dict = {}
        self._stacked: tuple[list, list, dict[object, int], torch.Tensor] | None = None

    def __contains__(self, key) -> bool:
        return key is None or key in self._kv

    def __len__(self) -> int:
        return len(self._kv)

    def keys(self) -> list:
        return list(self._kv)

    def length(self, key) -> int:
        """Prompt length of ``key`` (0 for ``None``)."""
        return 0 if key is None else self._kv[key].length

    def get(self, key) -> PromptKV | None:
        """The keys/values stored under ``key`` (None for ``None``, no prompt)."""
        return None if key is None else self._kv[key]

    def add(self, key, prompt_kv: PromptKV) -> None:
        """Add or replace the prompt stored under ``key`` (its keys/values are detached)."""
        self.check(key, prompt_kv)
        detached: dict[int, torch.Tensor] = {}  # by identity: a layer that reuses another's tensors keeps reusing them
        layers = [tuple(detached.setdefault(id(t), t.detach()) for t in kv) for kv in prompt_kv.layers]
        self._kv[key] = PromptKV(layers=layers, length=prompt_kv.length)
        self._stacked = None

    def check(self, key, prompt_kv: PromptKV) -> None:
        """Raise :class:`InjectionError` unless ``prompt_kv`` fits the table (changes nothing).

        With other prompts in the table, its layer count, key/value shapes, dtype and device must match
        theirs; replacing the only prompt may change them.
        """
        if key is None:
            raise InjectionError("the key None is reserved for 'no prompt'")
        others = [kv for k, kv in self._kv.items() if k != key]
        if not others:
            return
        ref = others[0].layers
        got = [(tuple(k.shape[1::2]), k.dtype, k.device) for k, _ in prompt_kv.layers]
        want = [(tuple(k.shape[1::2]), k.dtype, k.device) for k, _ in ref]
        if len(got) != len(want) or got != want:
            raise InjectionError(f"prompt {key!r}: keys/values do not match the table's model "
                                 f"(layers {len(got)} vs {len(want)}; per layer {got[:1]} vs {want[:1]})")

    def remove(self, key) -> None:
        del self._kv[key]
        self._stacked = None

    def _stack(self):
        if self._stacked is None:
            keys = list(self._kv)
            lmax = max(kv.length for kv in self._kv.values())
            ks, vs = [], []
            for layer in range(len(self._kv[keys[0]].layers)):
                source = self._source(keys, layer)
                if source is not None:  # the same tensors as an earlier layer in every prompt: one copy
                    ks.append(ks[source])
                    vs.append(vs[source])
                    continue
                k0 = self._kv[keys[0]].layers[layer][0]
                k_all = k0.new_zeros(len(keys), k0.shape[1], lmax, k0.shape[3])  # (N, kvh, Lmax, d)
                v0 = self._kv[keys[0]].layers[layer][1]
                v_all = v0.new_zeros(len(keys), v0.shape[1], lmax, v0.shape[3])
                for i, key in enumerate(keys):
                    k, v = self._kv[key].layers[layer]
                    # right-aligned by the layer's own key count: a sliding-window layer's cache keeps only the
                    # last window - 1 keys of a longer prompt (every mixed batch failed once one was loaded);
                    # the model's window never reaches the columns it dropped
                    n = k.shape[2] if self._kv[key].length else 0
                    if n:
                        k_all[i, :, lmax - n:] = k[0]
                        v_all[i, :, lmax - n:] = v[0]
                ks.append(k_all)
                vs.append(v_all)
            lengths = torch.tensor([self._kv[key].length for key in keys], device=ks[0].device)
            self._stacked = (ks, vs, {key: i for i, key in enumerate(keys)}, lengths)
        return self._stacked

    def _source(self, keys: list, layer: int) -> int | None:
        """The earliest layer whose keys and values are ``layer``'s own in every prompt of ``keys``, else None."""
        for j in range(layer):
            if all(self._kv[key].layers[layer][0] is self._kv[key].layers[j][0]
                   and self._kv[key].layers[layer][1] is self._kv[key].layers[j][1] for key in keys):
                return j
        return None

    def rows(self, keys: list) -> PromptKV | RowPrompts | None:
        """The prompts of a batch whose row ``i`` uses prompt ``keys[i]``.

        One distinct prompt gives a :class:`PromptKV` (expanded as views, no copy); no prompt at all gives
        ``None``; otherwise a :class:`RowPrompts`.
        """
        unknown = [k for k in set(keys) if k not in self]
        if unknown:
            raise InjectionError(f"no prompt {unknown[0]!r} in the table (have: {', '.join(map(str, self._kv))})")
        distinct = set(keys)
        if distinct == {None}:
            return None
        if len(distinct) == 1:
            return self._kv[keys[0]]
        ks, vs, index, lengths_all = self._stack()
        dev = ks[0].device
        # rows without a prompt borrow row 0 of the table; their length 0 masks every borrowed slot
        idx = torch.tensor([index[k] if k is not None else 0 for k in keys], device=dev)  # (B,)
        lengths = torch.where(torch.tensor([k is None for k in keys], device=dev), 0, lengths_all[idx])  # (B,)
        width = int(lengths.max())
        lmax = ks[0].shape[2]
        gathered: dict[int, torch.Tensor] = {}  # a stacked tensor two layers share is gathered once for both
        for t in ks + vs:
            if id(t) not in gathered:
                gathered[id(t)] = t[:, :, lmax - width:][idx]
        layers = [(gathered[id(k)], gathered[id(v)]) for k, v in zip(ks, vs, strict=True)]
        slots = torch.arange(width, device=dev)[None]  # (1, L)
        prefix_mask = (slots >= width - lengths[:, None]).long()  # (B, L)
        return RowPrompts(layers=layers, prefix_mask=prefix_mask, lengths=lengths)
