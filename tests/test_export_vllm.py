"""vLLM prompt_embeds export: the tensor is exactly what the model sees with the soft prompt."""

from __future__ import annotations

import pytest
import torch

from softprompt import forward
from softprompt.export_vllm import VllmExportError, decode, encode, prompt_embeds
from softprompt.methods import build_method
from tests.conftest import text_logits


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_prompt_embeds_reproduce_the_soft_prompt_forward(model, tokenizer, name):
    method = build_method(name, {"num_virtual_tokens": 4}, model, tokenizer).eval()
    text = "Review : good movie Sentiment :"
    emb = prompt_embeds(model, tokenizer, method, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert emb.shape == (4 + len(ids), 32)
    with torch.no_grad():
        # what a server that takes prompt embeddings computes: the plain forward on them, positions 0..P+T-1
        theirs = model(inputs_embeds=decode(encode(emb))[None]).logits[0, 4:]
        ids_t = torch.tensor([ids])
        ours = text_logits(model, ids_t, torch.ones_like(ids_t), forward.compute_prompt_kv(model, method()))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert isinstance(encode(emb), str) and torch.equal(decode(encode(emb)), emb)


@pytest.mark.parametrize("bos", [False, True])
def test_an_empty_text_without_a_bos_is_the_prompt_alone(model, tokenizer, bos):
    """No BOS (bos=False, or a model without one) and an empty text: the ids were torch.tensor([]), a float
    tensor, and the embedding lookup raised."""
    method = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tokenizer)
    lead = forward.family_of(model).lead_ids(tokenizer, bos)
    emb = prompt_embeds(model, tokenizer, method, "", bos=bos)
    assert emb.shape == (3 + len(lead), 32)
    torch.testing.assert_close(emb[:3], method.eval()().embeds.float(), atol=0, rtol=0)


def test_prefix_methods_are_refused_with_a_reason(model, tokenizer):
    method = build_method("prefix_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tokenizer)
    with pytest.raises(VllmExportError, match="keys/values at every layer"):
        prompt_embeds(model, tokenizer, method, "good")


def test_request_text_is_the_layout_the_prompt_was_trained_on(model, tokenizer, tmp_path):
    """A chat prompt's input is a user turn of its rendered conversation (no BOS added): the client sent the
    raw input, which the prompt never saw; a template prompt's input fills its template."""
    from softprompt.data.chat import ChatFormat, conversation_prompt
    from softprompt.export_vllm import request_text
    from softprompt.store import load_prompt, save_prompt
    from tests.test_chat import TEMPLATE

    method = build_method("prompt_tuning", {"num_virtual_tokens": 2}, model, tokenizer)
    chat = save_prompt(tmp_path / "chat", method, model, task={"kind": "chat", "chat_template": TEMPLATE,
                                                               "template": None}, bos=False)
    text, bos = request_text(load_prompt(chat), tokenizer, "good movie")
    assert text == conversation_prompt(tokenizer, ChatFormat(chat_template=TEMPLATE),
                                       [{"role": "user", "content": "good movie"}]) == "Review good movie .Sentiment"
    assert bos is False
    plain = save_prompt(tmp_path / "plain", method, model, task={"template": "Review : {text} Sentiment :",
                                                                 "target_field": "label"})
    assert request_text(load_prompt(plain), tokenizer, "good movie") == ("Review : good movie Sentiment :", True)
    two = save_prompt(tmp_path / "two", method, model, task={"template": "Country : {a} {b}", "target_field": "label"})
    with pytest.raises(VllmExportError, match="fill it yourself"):
        request_text(load_prompt(two), tokenizer, "France")


def test_an_encoder_decoder_prompt_is_refused_and_the_store_and_peft_export_keep_their_layout(tokenizer, tmp_path):
    """A T5 prompt was exported as [P, text] for a decoder (its encoder reads [P, src, </s>]); PromptStore.save
    had no bos flag (a chat or lm prompt saved through it was served with a BOS it never saw); export_peft's
    same-folder check compared unresolved paths ("p/../p" replaced p with PEFT-only files)."""
    from softprompt.store import PromptStore, StoreError, export_peft, load_prompt, save_prompt
    from tests.test_seq2seq import make_t5

    t5 = make_t5()
    method = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, t5, tokenizer)
    with pytest.raises(VllmExportError, match="encoder-decoder"):
        prompt_embeds(t5, tokenizer, method, "good")
    from tests.conftest import make_model

    model = make_model("llama")
    store = PromptStore(tmp_path / "s", create=True)
    lm = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tokenizer)
    store.save("lm", lm, model, bos=False)
    store.save("cls", lm, model)
    assert (store.load("lm").bos, store.load("cls").bos) == (False, True)
    save_prompt(tmp_path / "p", lm, model)
    before = sorted(p.name for p in (tmp_path / "p").iterdir())
    with pytest.raises(StoreError, match="the same folder"):
        export_peft(tmp_path / "p", tmp_path / "p" / ".." / "p", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == before and load_prompt(tmp_path / "p").bos


def test_served_weights_are_the_folder_an_alias_or_gguf_is_loaded_from(monkeypatch, tmp_path):
    from softprompt import model as model_mod
    from softprompt.export_vllm import served_weights

    monkeypatch.setattr(model_mod, "materialize_alias", lambda alias: tmp_path / f"alias-{alias}")
    monkeypatch.setattr(model_mod, "materialize_gguf", lambda path: tmp_path / f"gguf-{path.name}")
    assert served_weights("smollm2-135m-instruct") == str(tmp_path / "alias-smollm2-135m-instruct")
    assert served_weights("weights/m.Q4_1.gguf") == str(tmp_path / "gguf-m.Q4_1.gguf")
    assert served_weights("org/model") == "org/model" and served_weights("/models/m") == "/models/m"


class FakeOpenAI:
    """The openai client the example uses: a server serving ``SERVED``; requests recorded in ``SENT``."""

    SERVED: list[str] = []
    SENT: list[dict] = []

    def __init__(self, base_url, api_key):
        from types import SimpleNamespace

        self.models = SimpleNamespace(list=lambda: SimpleNamespace(data=[SimpleNamespace(id=m) for m in self.SERVED]))
        self.completions = SimpleNamespace(create=self.create)

    def create(self, **kwargs):
        from types import SimpleNamespace

        self.SENT.append(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(text=" good")])


def run_example(monkeypatch, served: list[str], *argv) -> list[dict]:
    import importlib.util
    import sys
    import types
    from pathlib import Path

    monkeypatch.setitem(sys.modules, "openai", types.SimpleNamespace(OpenAI=FakeOpenAI))
    monkeypatch.setattr(FakeOpenAI, "SERVED", served)
    monkeypatch.setattr(FakeOpenAI, "SENT", [])
    path = Path(__file__).resolve().parents[1] / "examples" / "vllm_client.py"
    spec = importlib.util.spec_from_file_location("vllm_client_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["vllm_client.py", *map(str, argv)])
    example.main()
    return FakeOpenAI.SENT


def test_the_vllm_client_example_asks_for_the_weights_it_embedded_with(monkeypatch, tmp_path, tiny_model_dir, tokenizer,
                                                                       capsys):
    """The embedded alias is the de-quantised GGUF: the example told vLLM to serve the hub checkpoint instead
    (other weights) and sent its requests there."""
    from softprompt import model as model_mod
    from softprompt.store import save_prompt
    from tests.conftest import make_model

    base = make_model("llama")  # the weights in tiny_model_dir
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4}, base, tokenizer)
    folder = save_prompt(tmp_path / "prompt", method, base, task={"template": "Review : {text} Sentiment :",
                                                                   "target_field": "label", "verbalizer": None})
    loaded = []
    monkeypatch.setattr(model_mod, "materialize_alias", lambda alias: loaded.append(alias) or tiny_model_dir)
    sent = run_example(monkeypatch, [str(tiny_model_dir)], "--prompt", folder, "--input", "good movie")
    assert loaded and set(loaded) == {"smollm2-135m-instruct"}  # the default --model, loaded from that folder
    assert [r["model"] for r in sent] == [str(tiny_model_dir)]
    text = tokenizer("Review : good movie Sentiment :", add_special_tokens=False)["input_ids"]
    assert decode(sent[0]["extra_body"]["prompt_embeds"]).shape == (4 + len(text), 32)
    assert capsys.readouterr().out == " good\n"

    run_example(monkeypatch, [], "--serve-command")
    assert capsys.readouterr().out == f"vllm serve {tiny_model_dir} --enable-prompt-embeds\n"
    with pytest.raises(SystemExit) as e:  # a server running other weights is refused before any request
        run_example(monkeypatch, ["HuggingFaceTB/SmolLM2-135M-Instruct"], "--prompt", folder, "--input", "good")
    assert e.value.code == 2 and FakeOpenAI.SENT == []
    assert f"start it with `vllm serve {tiny_model_dir} --enable-prompt-embeds`" in capsys.readouterr().err
    sent = run_example(monkeypatch, [str(tiny_model_dir)], "--model", tiny_model_dir, "--prompt", folder,
                       "--input", "good")
    assert [r["model"] for r in sent] == [str(tiny_model_dir)]
