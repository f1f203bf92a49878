"""Mixed-task batches: per-row prompts from a PromptTable give each row what it gets alone."""

from __future__ import annotations

import pytest
import torch

from softprompt import forward
from softprompt.data import Encoded, collate
from softprompt.engine.prompt_table import PromptTable
from softprompt.forward import causal
from tests.conftest import make_model, text_logits
from tests.test_forward import concat_logits

LENGTHS = {"a": 3, "b": 6, "c": 1}


def table_for(model, seed=0):
    torch.manual_seed(seed)
    prompts = {k: torch.randn(n, 32) for k, n in LENGTHS.items()}
    table = PromptTable()
    with torch.no_grad():
        for k, p in prompts.items():
            table.add(k, forward.compute_prompt_kv(model, p))
    return table, prompts


def reference_logits(model, prompt, ids):
    """One row alone, prompt prepended to inputs_embeds (or no prompt), no cache, no padding."""
    ids_t, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    if prompt is None:
        return model(input_ids=ids_t, attention_mask=mask).logits[0]
    return concat_logits(model, prompt, ids_t, mask)[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_rows_match_each_row_alone(arch_model, side):
    table, prompts = table_for(arch_model)
    keys = ["b", "a", None, "c", "a", "b"]
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [19], [20, 21]]
    batch = collate([Encoded(r, len(r)) for r in rows], 0, side)
    with torch.no_grad():
        rp = table.rows(keys)
        assert isinstance(rp, forward.RowPrompts) and rp.lengths.tolist() == [6, 3, 0, 1, 3, 6]
        logits = text_logits(arch_model, batch.input_ids, batch.attention_mask, rp)
        for i, (key, ids) in enumerate(zip(keys, rows, strict=True)):
            real = batch.attention_mask[i].bool()
            ref = reference_logits(arch_model, prompts.get(key), ids)
            torch.testing.assert_close(logits[i][real], ref, atol=1e-5, rtol=1e-4)


def test_single_prompt_batch_shares_views_and_none_means_no_prompt(model):
    table, _ = table_for(model)
    assert isinstance(table.rows(["a", "a"]), forward.PromptKV)
    assert table.rows([None, None]) is None
    with pytest.raises(forward.InjectionError, match="no prompt 'zzz'"):
        table.rows(["a", "zzz"])


def test_mixed_greedy_decoding_matches_each_row_alone(arch_model):
    table, prompts = table_for(arch_model)
    keys = ["a", "b", None, "c"]
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15]]
    batch = collate([Encoded(r, len(r)) for r in rows], 0, "left")
    with torch.no_grad():
        got = forward.generate(arch_model, batch.input_ids, batch.attention_mask, table.rows(keys), 5, None)
        for key, ids, new in zip(keys, rows, got, strict=True):
            ids = list(ids)
            for _ in range(5):
                ids.append(int(reference_logits(arch_model, prompts.get(key), ids)[-1].argmax()))
            assert new == ids[-5:]


def test_decode_per_row_settings_stop_callback_and_finish_reasons(model):
    table, _ = table_for(model)
    batch = collate([Encoded([5, 6, 7], 3), Encoded([8, 9], 2), Encoded([10], 1)], 0, "left")
    rows = [forward.RowSampling(4), forward.RowSampling(2),
            forward.RowSampling(6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        out = causal.decode(model, batch.input_ids, batch.attention_mask, table.rows(["a", "b", "c"]), rows, None,
                            should_stop=lambda i, toks, lps: i == 0 and len(toks) == 3)
    assert [len(t) for t in out.tokens] == [3, 2, 6] and out.finish == ["stop", "length", "length"]
    # a sampled row is reproducible from its seed, alone or in a batch
    alone = collate([Encoded([10], 1)], 0, "left")
    rows_alone = [forward.RowSampling(6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        again = causal.decode(model, alone.input_ids, alone.attention_mask, table.rows(["c"]), rows_alone, None)
    assert again.tokens[0] == out.tokens[2]


def test_table_refuses_keys_values_of_another_model(model):
    table, _ = table_for(model)
    other = make_model("gpt2")
    with torch.no_grad(), pytest.raises(forward.InjectionError, match="do not match"):
        table.add("x", forward.compute_prompt_kv(other, torch.randn(2, 32)))
    table.remove("a")
    assert "a" not in table and len(table) == 2
