"""softprompt distill: the cached-context teacher, the KL against a full-logits reference, a short distillation
run, the stored result and the flag errors."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from softprompt.cli import main
from softprompt.data import collate, leading_special_ids
from softprompt.data.tokenize import Encoded
from softprompt.forward import compute_prompt_kv, family_of
from softprompt.forward.distill import context_teacher, distill_loss, pair_logprobs
from softprompt.store import PromptStore, load_prompt
from tests.conftest import WORD_IDS, make_model, make_tokenizer
from tests.test_seq2seq import make_t5
from tests.test_seq_cls import make_encoder

CONTEXT = ("Review : the movie was very good . Sentiment : positive . "
           "Review : the film was awful . Sentiment : negative .")
INPUTS = ["the plot was great", "a movie", "the film is bad", "the plot is not good", "very awful film",
          "the movie was great", "the film was not bad", "a plot", "the movie is very good", "Review : awful",
          "the film was very good", "a great plot", "the movie is not awful", "Sentiment : good"]


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The test vocabulary with a BOS ([EOS]'s id stands in for it) put in front of every text."""
    inner = Tokenizer(models.WordLevel(WORD_IDS, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.post_processor = processors.TemplateProcessing(single="[EOS] $A", special_tokens=[("[EOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def full_logprobs(model, embeds: torch.Tensor) -> torch.Tensor:
    """HF's own forward over one row of input embeddings: ``(L, V)`` log-probabilities."""
    return torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0].float(), dim=-1)


def reference(model, tok, prompt: torch.Tensor, x: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (context ids concatenated in front of the input, one forward) and student (prompt embeddings,
    BOS, input) log-probabilities after the context and after every input token, aligned: two ``(n, V)``."""
    lead = leading_special_ids(tok)
    ctx = lead + tok(CONTEXT, add_special_tokens=False)["input_ids"]
    emb = model.get_input_embeddings()
    t = full_logprobs(model, emb(torch.tensor(ctx + x)))  # (len(ctx)+len(x), V)
    s = full_logprobs(model, torch.cat([prompt, emb(torch.tensor(lead + x))]))  # (P+len(lead)+len(x), V)
    skip = 0 if lead else 1  # without a BOS the student has no position for "right after the context"
    p, n = prompt.shape[0], len(x) + 1 - skip
    return t[len(ctx) - 1 + skip:][:n], s[p + len(lead) - 1 + skip:][:n]


@pytest.mark.parametrize("make_tok", [make_tokenizer, bos_tokenizer], ids=["no-bos", "bos"])
def test_cached_context_teacher_equals_the_context_concatenated_into_the_input(make_tok):
    model, tok = make_model("llama"), make_tok()
    teacher = context_teacher(model, tok, CONTEXT)
    assert teacher.num_tokens == len(CONTEXT.split())
    xs = [tok(s, add_special_tokens=False)["input_ids"] for s in [*INPUTS[:3], "movie"]]  # one token: compared too
    batch = collate([Encoded(x, 1) for x in xs], pad_id=0)  # right-padded rows of different lengths
    prompt = torch.randn(3, 32) * 0.5
    with torch.no_grad():
        t_lp, s_lp = pair_logprobs(model, teacher, batch.input_ids, batch.attention_mask, prompt)
        refs = [reference(model, tok, prompt, x) for x in xs]
    torch.testing.assert_close(t_lp, torch.cat([r[0] for r in refs]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_lp, torch.cat([r[1] for r in refs]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make_tok", [make_tokenizer, bos_tokenizer], ids=["no-bos", "bos"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_loss_equals_a_full_logits_reference_kl_with_its_gradient(make_tok, temperature):
    model, tok = make_model("llama"), make_tok()
    teacher = context_teacher(model, tok, CONTEXT)
    xs = [tok(s, add_special_tokens=False)["input_ids"] for s in INPUTS[3:6]]
    batch = collate([Encoded(x, 1) for x in xs], pad_id=0)
    prompt = (torch.randn(4, 32) * 0.5).requires_grad_()
    loss = distill_loss(model, teacher, batch, compute_prompt_kv(model, prompt), temperature)  # shared-KV pass
    (grad,) = torch.autograd.grad(loss, prompt)
    ref_prompt = prompt.detach().clone().requires_grad_()
    kls = []
    for x in xs:  # independent: HF logits, temperature on the logits, torch's kl_div
        t, s = reference(model, tok, ref_prompt, x)
        t, s = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
        kls.append(F.kl_div(s, t.detach(), log_target=True, reduction="none").sum(-1))
    ref = torch.cat(kls).mean() * temperature ** 2
    (ref_grad,) = torch.autograd.grad(ref, ref_prompt)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-3)
    assert float(loss.detach()) > 0
    concat = distill_loss(model, teacher, batch, prompt.detach(), temperature)  # the concat pass: same value
    torch.testing.assert_close(concat, loss.detach(), atol=1e-6, rtol=1e-4)


@pytest.fixture
def tiny_dirs(tmp_path):
    d = tmp_path / "llama"
    make_model("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    (tmp_path / "ctx.txt").write_text(CONTEXT + "\n")
    (tmp_path / "inputs.txt").write_text("\n".join(INPUTS) + "\n")
    return tmp_path


def run_distill(tmp_path, *extra: str) -> int:
    return main(["distill", "--model", str(tmp_path / "llama"), "--context-file", str(tmp_path / "ctx.txt"),
                 "--num-virtual-tokens", "4", "--init", "random", "--init-scale", "0.5", "--batch-size", "4",
                 "--optimizer", "adamw", "--lr", "0.02", "--warmup-steps", "0", "--schedule", "constant",
                 "--held-out", "0.3", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "run"), *extra])


def test_distillation_lowers_held_out_kl_and_saves_a_stored_prompt(tiny_dirs, capsys, monkeypatch):
    from softprompt.workflows import distilling

    tmp = tiny_dirs
    real, batches = distilling.held_out_kl, []

    def recorded(*a, **kw):  # the held-out KL's batch was a fixed 16 rows of (N, V) tensors, whatever --batch-size
        batches.append(a[5] if len(a) > 5 else kw.get("batch_size"))
        return real(*a, **kw)

    monkeypatch.setattr(distilling, "held_out_kl", recorded)
    real_pair, decoded = distilling.greedy_pair, []

    def kept(*a, **kw):  # the greedy continuations each row's agreement is computed from
        decoded.append(real_pair(*a, **kw))
        return decoded[-1]

    monkeypatch.setattr(distilling, "greedy_pair", kept)
    rc = run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "60",
                     "--store", str(tmp / "store"), "--task", "reviews")
    assert rc == 0
    report = json.loads((tmp / "run" / "distill.json").read_text())
    rows = report["held_out"]
    init, after = rows["soft prompt at init"]["kl"], rows["distilled soft prompt"]["kl"]
    assert after < 0.3 * init, rows  # a clear margin
    assert after < rows["no context (base model)"]["kl"]
    assert report["held_out_inputs"] == 4 and report["train_inputs"] == 10
    assert batches == [4, 4, 4]  # --batch-size 4: before training (no context, init) and after
    assert report["context_tokens"] == len(CONTEXT.split()) and report["tokens_saved_per_request"] == 23 - 4
    # each row's agreement, recounted from the continuations it was measured on (in the report's order)
    assert len(decoded) == len(rows) == 3
    for m, (teacher_out, other) in zip(rows.values(), decoded, strict=True):
        assert len(teacher_out) == len(other) == 4 and all(len(t) == 4 for t in teacher_out + other)
        same = [[a == b for a, b in zip(t, o, strict=True)] for t, o in zip(teacher_out, other, strict=True)]
        assert m["greedy_exact"] == sum(all(r) for r in same) / 4
        assert m["greedy_token"] == sum(map(sum, same)) / 16
    out = capsys.readouterr().out
    assert "distilled soft prompt" in out and "tokens saved per request: 19" in out
    # a normal stored prompt: it loads, records where it came from, and serves from the store's engine
    model = make_model("llama")
    stored = load_prompt(tmp / "run" / "prompt", model)
    source = stored.meta["task"]["distilled_from"]
    assert source["context_tokens"] == 23
    assert source["context_sha256"] == hashlib.sha256((CONTEXT + "\n").encode()).hexdigest()
    assert stored.meta["metrics"]["held_out"]["distilled soft prompt"]["kl"] == after
    assert "reviews" in PromptStore(tmp / "store").names()
    assert main(["generate", "--model", str(tmp / "llama"), "--store", str(tmp / "store"), "--task", "reviews",
                 "--input", "the movie", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "reviews"
    # it has no task of its own: eval says so instead of scoring it on the default dataset
    assert main(["eval", "--model", str(tmp / "llama"), "--prompt", str(tmp / "run" / "prompt")]) == 2
    assert "distilled from a context" in capsys.readouterr().err


def test_agreement_counts_whole_continuations_and_tokens_at_the_same_step():
    from softprompt.workflows.distilling import agreement

    teacher = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [4, 4, 4]]
    other = [[5, 6, 7], [8, 0, 10], [0, 11, 12], [4, 4, 4]]  # the third: the right tokens, one step late
    assert agreement(teacher, other) == {"greedy_exact": 2 / 4, "greedy_token": 8 / 12}
    assert agreement(teacher, teacher) == {"greedy_exact": 1.0, "greedy_token": 1.0}
    assert agreement([[1, 2]], [[3, 4]]) == {"greedy_exact": 0.0, "greedy_token": 0.0}


def test_sampled_inputs_are_seeded(tiny_dirs):
    tmp = tiny_dirs
    texts = []
    for run in ("a", "b"):
        assert run_distill(tmp, "--sample-inputs", "6", "--sample-length", "5", "--max-steps", "2",
                           "--output-dir", str(tmp / run)) == 0
        texts.append(json.loads((tmp / run / "distill.json").read_text()))
    # 6 samples; one that ends (EOS) at once gives no input
    assert re.match(r"[1-6] continuations of the context sampled from the model", texts[0]["inputs"])
    assert texts[0]["inputs"] == texts[1]["inputs"]
    assert texts[0]["held_out"]["soft prompt at init"] == texts[1]["held_out"]["soft prompt at init"]


def test_a_resume_with_another_context_or_temperature_is_refused(tiny_dirs, capsys):
    # the checkpoint compared the loop's settings and the inputs only: a resume went on training the prompt of
    # context A against teacher B, and the saved prompt said B
    tmp = tiny_dirs
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "2") == 0
    (tmp / "other.txt").write_text(CONTEXT.replace("good", "bad") + "\n")
    capsys.readouterr()
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "4", "--resume",
                       "--context-file", str(tmp / "other.txt")) == 2
    assert "the distilled context (another --context or --context-file)" in capsys.readouterr().err
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "4", "--resume",
                       "--distill-temperature", "2") == 2
    assert "--distill-temperature 1.0 there, 2.0 now" in capsys.readouterr().err
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "4", "--resume") == 0


def test_a_runs_config_yaml_repeats_the_run(tiny_dirs, capsys):
    # the config.yaml a run writes has a distill section, which distill's own --config refused
    tmp = tiny_dirs
    assert run_distill(tmp, "--sample-inputs", "6", "--sample-length", "5", "--max-steps", "2",
                       "--output-dir", str(tmp / "a")) == 0
    first = json.loads((tmp / "a" / "distill.json").read_text())
    assert main(["distill", "--config", str(tmp / "a" / "config.yaml"), "--output-dir", str(tmp / "b")]) == 0
    again = json.loads((tmp / "b" / "distill.json").read_text())
    assert again["held_out"] == first["held_out"] and again["inputs"] == first["inputs"]
    # flags win over the file; a mistyped key or value in its distill section is named
    (tmp / "bad.yaml").write_text("distill:\n  held_out: 2\n  contxt: x\n")
    assert main(["distill", "--config", str(tmp / "bad.yaml"), "--context", "a movie", "--sample-inputs", "4",
                 "--output-dir", str(tmp / "c")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: distill.contxt is not a known field" in err
    assert "bad.yaml: distill.held_out must be in (0, 1)" in err
    (tmp / "train.yaml").write_text("data:\n  max_length: 512\n")  # a train run's section, dropped in silence
    assert main(["distill", "--config", str(tmp / "train.yaml"), "--context", "a movie", "--sample-inputs", "4",
                 "--output-dir", str(tmp / "c")]) == 2
    assert "train.yaml: distill reads no data: section" in capsys.readouterr().err
    assert not (tmp / "c").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--context", "a movie", "--sample-inputs", "4", "--stop-when-flat", "0.02"],
     "--stop-when-flat: distill validates nothing while it trains"),
    (["--context", "a movie", "--sample-inputs", "4", "--metric", "accuracy"], "--metric: distill validates nothing"),
    (["--inputs-file", "X"], "give the context: --context TEXT or --context-file FILE"),
    (["--context", "a movie"], "give the inputs: --inputs-file FILE or --sample-inputs N"),
    (["--context", "a movie", "--context-file", "X", "--sample-inputs", "4"], "one of them"),
    (["--context", "a movie", "--sample-inputs", "4", "--held-out", "1.5"], "--held-out must be in (0, 1)"),
    (["--context", "a movie", "--sample-inputs", "4", "--data-seed", str(2**64)], "--data-seed must be in"),
])
def test_flag_errors_are_clear(tmp_path, capsys, flags, message):
    assert main(["distill", "--model", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert "softprompt distill: error:" in err and message in err


@pytest.mark.parametrize("kind", ["seq2seq", "classifier"])
def test_other_model_families_are_refused(tiny_dirs, capsys, kind):
    tmp = tiny_dirs
    if kind == "seq2seq":
        make_t5().save_pretrained(tmp / "t5")
        make_tokenizer().save_pretrained(tmp / "t5")
        flags = ["--model", str(tmp / "t5")]
    else:
        make_encoder("bert").save_pretrained(tmp / "bert")
        make_tokenizer().save_pretrained(tmp / "bert")
        flags = ["--model", str(tmp / "bert"), "--task-type", "seq_cls"]
    assert main(["distill", *flags, "--context-file", str(tmp / "ctx.txt"), "--sample-inputs", "4",
                 "--output-dir", str(tmp / "run")]) == 2
    err = capsys.readouterr().err
    assert "softprompt distill: error: softprompt distill needs a decoder-only language model" in err


def test_inputs_from_a_record_file_need_their_field(tiny_dirs, capsys):
    tmp = tiny_dirs
    path = tmp / "inputs.jsonl"
    path.write_text("".join(json.dumps({"q": s}) + "\n" for s in INPUTS))
    assert run_distill(tmp, "--inputs-file", str(path), "--max-steps", "1") == 2
    assert "holds records: name the input field, --text-field FIELD" in capsys.readouterr().err
    assert run_distill(tmp, "--inputs-file", str(path), "--text-field", "q", "--max-steps", "1") == 0
    assert json.loads((tmp / "run" / "distill.json").read_text())["train_inputs"] == 10
    # a file of an extension nothing reads was read as plain lines: the model distilled lines of JSON
    ndjson = tmp / "inputs.ndjson"
    ndjson.write_text(path.read_text())
    assert run_distill(tmp, "--inputs-file", str(ndjson), "--max-steps", "1") == 2
    assert "inputs.ndjson: '.ndjson' is not read; accepted: .txt" in capsys.readouterr().err


def test_a_context_longer_than_the_models_positions_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                                         monkeypatch):
    """... and before the model loads: by its tokenizer and config."""
    from softprompt.workflows import distilling

    monkeypatch.setattr(distilling, "load_model_from_args", lambda *a: pytest.fail("the model was loaded"))
    d = tmp_path / "gpt2"  # learned positions: 256 of them; reading past them raised an IndexError
    make_model("gpt2").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    (tmp_path / "long.txt").write_text(" ".join(["the movie was good ."] * 60) + "\n")  # 300 tokens
    (tmp_path / "inputs.txt").write_text("\n".join(INPUTS) + "\n")
    argv = ["distill", "--model", str(d), "--inputs-file", str(tmp_path / "inputs.txt"), "--max-steps", "1",
            "--output-dir", str(tmp_path / "run")]
    assert main([*argv, "--context-file", str(tmp_path / "long.txt")]) == 2
    err = capsys.readouterr().err
    assert "the context (300 tokens" in err and "its context is 256 positions" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    # a prompt too long beside the inputs is refused too; sampled inputs are checked by --sample-length
    (tmp_path / "ctx.txt").write_text(CONTEXT + "\n")
    assert main([*argv, "--context-file", str(tmp_path / "ctx.txt"), "--num-virtual-tokens", "250"]) == 2
    assert "--num-virtual-tokens 250 + the longest input window" in capsys.readouterr().err
    assert main(["distill", "--model", str(d), "--context-file", str(tmp_path / "ctx.txt"), "--sample-inputs", "4",
                 "--sample-length", "240", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--sample-length 240" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_default_output_folder_is_checked_and_a_text_field_for_plain_text_is_refused(tiny_dirs, capsys,
                                                                                         monkeypatch):
    """The default runs/distill was set after the checks (which checked train's runs/rotten_tomatoes): a file
    there was an OSError traceback. --text-field with a plain-text inputs file was silently unused."""
    tmp = tiny_dirs
    monkeypatch.chdir(tmp)
    (tmp / "runs").mkdir(exist_ok=True)
    (tmp / "runs" / "distill").write_text("a file")
    assert main(["distill", "--model", str(tmp / "llama"), "--context-file", str(tmp / "ctx.txt"),
                 "--inputs-file", str(tmp / "inputs.txt")]) == 2
    assert "--output-dir runs/distill: exists and is not a folder" in capsys.readouterr().err
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--text-field", "text") == 2
    assert "--text-field names a field of a record file" in capsys.readouterr().err


def test_sampled_inputs_keep_what_the_model_wrote_up_to_its_end():
    # decoded without special tokens and stripped: a sample that ended its text and began another was one input
    # glued together, and a leading space (a different token for a byte-level BPE) was dropped
    from softprompt.workflows.distilling import sampled_texts

    tok = make_tokenizer()
    ids = tok("the movie was good", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    samples = [ids[:2] + [eos] + ids[2:], [eos] + ids, ids[:3] + [tok.unk_token_id] + ids[3:]]
    texts = sampled_texts(tok, samples, (eos,))
    assert texts[0] == tok.decode(ids[:2])  # cut at the end it wrote
    assert len(texts) == 2  # a sample that ended at once gives no input
    assert tok(texts[1], add_special_tokens=False)["input_ids"] == ids[:3] + [tok.unk_token_id] + ids[3:]


def test_a_context_that_starts_with_the_bos_counts_it_once():
    # the BOS a chat template writes was counted as a context token the prompt saves: a request with the
    # distilled prompt still starts its text with it ([P, BOS, text])
    model, tok = make_model("llama"), bos_tokenizer()
    plain, with_bos = context_teacher(model, tok, CONTEXT), context_teacher(model, tok, "[EOS] " + CONTEXT)
    assert plain.num_tokens == with_bos.num_tokens == len(CONTEXT.split())
    assert plain.kv is not None and plain.last_id == with_bos.last_id


def test_the_context_text_stays_out_of_the_saved_and_stored_prompt(tiny_dirs, capsys):
    """The prompt's training config held ``distill.context`` (the whole text) and ``init_text`` (its first P
    tokens, in the method config too): a confidential system prompt shipped inside the prompt and the store, and
    ``store show`` printed it. The README says it records the context's token count and sha256, not its text."""
    tmp = tiny_dirs
    secret = "Review : the movie was very good . Sentiment : positive . Review : the film was awful"
    derived = "Review : the movie"  # its first 4 tokens: the default init text
    assert main(["distill", "--model", str(tmp / "llama"), "--context", secret, "--inputs-file",
                 str(tmp / "inputs.txt"), "--num-virtual-tokens", "4", "--max-steps", "1", "--held-out", "0.3",
                 "--max-new-tokens", "2", "--output-dir", str(tmp / "run"), "--store", str(tmp / "store"),
                 "--task", "sys"]) == 0
    capsys.readouterr()
    for folder in (tmp / "run" / "prompt", tmp / "store" / "sys"):
        for f in folder.iterdir():
            assert derived.encode() not in f.read_bytes(), f
    assert main(["store", "show", "sys", "--store", str(tmp / "store")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert derived not in json.dumps(shown)
    assert shown["train_config"]["distill"]["context"] is None and shown["train_config"]["prompt"]["init_text"] is None
    assert shown["task"]["distilled_from"]["context_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert shown["task"]["distilled_from"]["context_tokens"] == len(secret.split())
    # it still loads and serves; the run's own config.yaml (local, to rerun it) keeps the context
    assert main(["generate", "--model", str(tmp / "llama"), "--store", str(tmp / "store"), "--task", "sys",
                 "--input", "the movie", "--max-new-tokens", "2"]) == 0
    assert secret in (tmp / "run" / "config.yaml").read_text().replace("\n    ", " ")


def test_a_refused_resume_or_a_refused_method_leaves_the_runs_config_yaml(tiny_dirs, capsys, monkeypatch):
    """config.yaml was written before the method was built and before train() checked the checkpoint: a refused
    --resume (another temperature) or --init class_labels (refused once the model had loaded) overwrote the
    interrupted run's settings with the refused ones."""
    from softprompt.workflows import distilling

    tmp = tiny_dirs
    argv = ("--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "2")
    assert run_distill(tmp, *argv) == 0
    config = tmp / "run" / "config.yaml"
    first = config.read_text()
    assert run_distill(tmp, *argv, "--resume", "--distill-temperature", "2") == 2
    assert "--distill-temperature 1.0 there, 2.0 now" in capsys.readouterr().err
    assert config.read_text() == first
    # refused before the model loads, the folder untouched
    real = distilling.load_model_from_args
    monkeypatch.setattr(distilling, "load_model_from_args", lambda *a: pytest.fail("the model was loaded"))
    assert run_distill(tmp, *argv, "--init", "class_labels", "--lr", "0.5") == 2
    assert "--init class_labels starts the prompt from the labels' tokens" in capsys.readouterr().err
    assert run_distill(tmp, *argv, "--method", "prefix_tuning", "--init", "sample_vocab") == 2
    assert "--method prefix_tuning: prefix_tuning config: --init must be one of" in capsys.readouterr().err
    assert config.read_text() == first
    # a resume that runs rewrites it once it is over: its own settings
    monkeypatch.setattr(distilling, "load_model_from_args", real)
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "4", "--resume") == 0
    assert "max_steps: 4" in config.read_text() and "resume: true" in config.read_text()


def test_a_rerun_of_config_yaml_derives_the_init_text_from_its_own_context(tiny_dirs, capsys, monkeypatch):
    """The init text derived from the context (its first P tokens) was written into config.yaml and read back
    as a user's --init-text: a rerun with another context or P started from the old context's words."""
    from softprompt import methods

    tmp = tiny_dirs
    real, used = methods.build_method, []

    def build(name, cfg, *a, **kw):
        used.append(cfg.get("init_text"))
        return real(name, cfg, *a, **kw)

    monkeypatch.setattr(methods, "build_method", build)
    assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "1", "--init", "text",
                       "--output-dir", str(tmp / "a")) == 0
    assert used[-1] == "Review : the movie"
    assert "init_text: null" in (tmp / "a" / "config.yaml").read_text()
    (tmp / "ctx.txt").write_text("Sentiment : the plot is not bad . " + CONTEXT + "\n")  # the context changed
    assert main(["distill", "--config", str(tmp / "a" / "config.yaml"), "--output-dir", str(tmp / "b")]) == 0
    assert used[-1] == "Sentiment : the plot"
    assert main(["distill", "--config", str(tmp / "a" / "config.yaml"), "--output-dir", str(tmp / "c"),
                 "--num-virtual-tokens", "2"]) == 0
    assert used[-1] == "Sentiment :"
    # a text the user gave is theirs: recorded and reused as given
    assert main(["distill", "--config", str(tmp / "a" / "config.yaml"), "--output-dir", str(tmp / "d"),
                 "--init-text", "a movie"]) == 0
    assert used[-1] == "a movie" and "init_text: a movie" in (tmp / "d" / "config.yaml").read_text()


def test_one_token_inputs_are_distilled_and_counted(tiny_dirs, capsys, monkeypatch):
    """Inputs were encoded as LM windows of >= 2 tokens: a one-token input was dropped in silence while the report
    counted it (train_inputs 8, 3 used), and a held-out share of one-token inputs stopped the run late. It has
    positions to compare (after its token, and right after the context with a BOS): kept, and trained on."""
    from softprompt.workflows import distilling

    tmp = tiny_dirs
    words = ["movie", "plot", "film", "good", "bad", "great", "awful", "very", "not", "a"]
    (tmp / "one.txt").write_text("\n".join(words) + "\n")
    real, trained, measured = distilling.train, [], []

    def counted(model, tok, method, task, *a, **kw):  # the windows train() encodes from the train split
        trained.append(len(family_of(model).encode_examples(tok, task.examples("train"), task.format, 256)))
        return real(model, tok, method, task, *a, **kw)

    real_kl = distilling.held_out_kl
    monkeypatch.setattr(distilling, "train", counted)
    monkeypatch.setattr(distilling, "held_out_kl", lambda m, t, enc, *a, **kw: measured.append(len(enc))
                        or real_kl(m, t, enc, *a, **kw))
    assert run_distill(tmp, "--inputs-file", str(tmp / "one.txt"), "--max-steps", "2") == 0
    report = json.loads((tmp / "run" / "distill.json").read_text())
    assert report["train_inputs"] == 7 and report["held_out_inputs"] == 3 and report["inputs_without_tokens"] == 0
    assert trained == [7] and measured == [3, 3, 3]  # every input, in training and in the report
    assert report["held_out"]["distilled soft prompt"]["kl"] > 0

    # an input with no token at all has nothing to compare: left out and counted, not dropped in silence
    from softprompt.workflows.distilling import with_tokens

    def tok(texts, add_special_tokens=False):
        return {"input_ids": [[] if t == "\u200b" else [5] for t in texts]}

    assert with_tokens(tok, ["a", "\u200b", "b"]) == (["a", "b"], ["\u200b"])


def test_an_ensemble_member_as_the_store_task_is_refused_before_the_model_loads(tiny_dirs, capsys, monkeypatch):
    """--store S --task M, M a member of an ensemble of S: the distilled prompt (no labels) could not replace it,
    and that was found only when it was stored, after training."""
    from softprompt.methods import build_method
    from softprompt.workflows import distilling

    tmp = tiny_dirs
    model, tok = make_model("llama"), make_tokenizer()
    store = PromptStore(tmp / "store", create=True)
    task = {"template": "Review : {text} Sentiment :", "target_field": "label",
            "verbalizer": {"positive": "good", "negative": "bad"}}
    for name in ("m1", "m2", "free"):
        store.save(name, build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tok),
                   model, task=task)
    store.add_ensemble("ens", ["m1", "m2"])
    real = distilling.load_model_from_args
    monkeypatch.setattr(distilling, "load_model_from_args", lambda *a: pytest.fail("the model was loaded"))
    argv = ("--inputs-file", str(tmp / "inputs.txt"), "--max-steps", "1", "--store", str(tmp / "store"))
    assert run_distill(tmp, *argv, "--task", "m1") == 2
    err = capsys.readouterr().err
    assert "--task m1: entry 'm1' is a member of ensemble(s) 'ens', which combine classification prompts" in err
    assert not (tmp / "run").exists() and store.ensemble("ens").members == ["m1", "m2"]
    # a prompt no ensemble lists is replaced, as before
    monkeypatch.setattr(distilling, "load_model_from_args", real)
    assert run_distill(tmp, *argv, "--task", "free") == 0
    assert store.show("free")["task"]["objective"] == "distill"


def test_a_prompt_as_long_as_the_context_is_refused(tiny_dirs, capsys, monkeypatch):
    """--num-virtual-tokens at or above the context's tokens trained and saved a prompt that reported
    "tokens saved per request: -8", exit 0: it saves nothing, and the context itself is the exact teacher.
    Refused by the tokenizer before the model loads (it was refused once the model had loaded)."""
    from softprompt.workflows import distilling

    tmp = tiny_dirs
    monkeypatch.setattr(distilling, "load_model_from_args", lambda *a: pytest.fail("the model was loaded"))
    for p in ("23", "31"):  # the context has 23 tokens
        assert run_distill(tmp, "--inputs-file", str(tmp / "inputs.txt"), "--num-virtual-tokens", p) == 2
        err = capsys.readouterr().err
        assert f"--num-virtual-tokens {p} >= the context's 23 tokens: the prompt would save {23 - int(p)} tokens" in err
        assert "give --num-virtual-tokens below 23" in err and not (tmp / "run").exists()


DISTILLED = {"template": None, "target_field": None, "verbalizer": None, "target_prefix": None,
             "objective": "distill", "distilled_from": {"context_tokens": 23, "context_sha256": "0" * 64,
                                                        "inputs": "14 inputs from inputs.txt", "temperature": 1.0}}


def distilled_store(root):
    from softprompt.methods import build_method

    model, tok = make_model("llama"), make_tokenizer()
    store = PromptStore(root, create=True)
    store.save("d", build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random"}, model, tok), model,
               task=DISTILLED)
    store.save("plain", build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random"}, model, tok),
               model, task=None)
    return model, tok, store


def test_generate_messages_on_a_distilled_prompt_is_refused(tiny_dirs, capsys, monkeypatch):
    """A distilled prompt learned raw text right after its context: generate --messages rendered a chat template's
    turns after it, a layout it never saw, and answered as if it were a chat system prompt. Refused before the
    model loads (it was refused once the model had loaded), for --store/--task and --prompt alike."""
    from softprompt import workflows
    from tests.test_chat import TEMPLATE

    real = workflows.load_model_from_args
    monkeypatch.setattr(workflows, "load_model_from_args", lambda *a: pytest.fail("the model was loaded"))
    tmp = tiny_dirs
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE  # a chat model's tokenizer
    tok.save_pretrained(tmp / "llama")
    distilled_store(tmp / "store")
    argv = ["generate", "--model", str(tmp / "llama"), "--store", str(tmp / "store"), "--max-new-tokens", "2"]
    messages = json.dumps([{"role": "user", "content": "the movie was great"}])
    assert main([*argv, "--task", "d", "--messages", messages]) == 2
    err = capsys.readouterr().err
    assert "softprompt generate: error: task 'd' was distilled from a context (softprompt distill)" in err
    assert "no chat system prompt" in err
    direct = ["generate", "--model", str(tmp / "llama"), "--prompt", str(tmp / "store" / "d"), "--messages", messages]
    assert main(direct) == 2
    assert "softprompt generate: error: task 'prompt' was distilled from a context" in capsys.readouterr().err
    monkeypatch.setattr(workflows, "load_model_from_args", real)
    assert main([*argv, "--task", "d", "--input", "the movie"]) == 0  # plain text, as it trained
    assert main([*argv, "--task", "plain", "--messages", messages]) == 0  # other prompts: as before


def test_the_servers_chat_route_refuses_a_distilled_prompt(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.engine import Engine
    from softprompt.server import Scheduler, ServerState, create_app

    model, tok, store = distilled_store(tmp_path / "store")
    engine = Engine.from_store(store, model, tok)
    body = {"messages": [{"role": "user", "content": "the movie was great"}], "max_tokens": 2}
    with TestClient(create_app(ServerState(engine, Scheduler(engine)))) as client:
        r = client.post("/v1/chat/completions", json={"model": "d", **body})
        assert r.status_code == 400, r.text
        assert "task 'd' was distilled from a context" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={"model": "d", **body, "stream": True}).status_code == 400
        assert client.post("/v1/completions", json={"model": "d", "prompt": "the movie", "max_tokens": 2}
                           ).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "plain", **body}).status_code == 200
