"""File formats, templates/verbalizers and load_task with data files."""

from __future__ import annotations

import json
import re

import pytest

from softprompt.data import (
    DataError,
    Example,
    TaskFormat,
    load_records,
    load_records_with_lines,
    load_task,
    parse_verbalizer,
)

SENTIMENT = TaskFormat("Review: {text}\nSentiment:", "label", {"pos": "great", "neg": "terrible"})


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# --- load_records ---------------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"text": "a", "label": "pos"}\n\n  \n{"text": "b", "label": 1}\n')
    records, lines = load_records_with_lines(f)
    assert records == [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}]
    assert lines == [1, 4]
    assert load_records(str(f)) == records


def test_json_array_file(tmp_path):
    f = write(tmp_path / "d.json", json.dumps([{"a": 1}, {"a": 2}], indent=2))
    assert load_records(f) == [{"a": 1}, {"a": 2}]


def test_json_array_records_are_reported_at_their_own_line(tmp_path):
    # an item's index was reported as its "line": item 2 of a pretty-printed file is on line 6
    f = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}],
                                              indent=2))
    assert load_records_with_lines(f)[1] == [2, 6]
    with pytest.raises(DataError, match=r"d\.json line 6: field 'label' has label 'meh'"):
        load_task(train_file=f, template="{text}", target_field="label", verbalizer="pos=good")
    f = write(tmp_path / "e.json", '[\n  {"a": 1},\n  3\n]')
    with pytest.raises(DataError, match=r"^e\.json line 3 \(item 2\): expected a JSON object, got int"):
        load_records(f)
    for text, line, what in (('[{"a": 1}\n {"a": 2}]', 2, "Expecting ',' delimiter"),
                             ('[{"a": 1}]\n\n x', 3, "Extra data"), ('[{"a": 1},]', 1, "Expecting value")):
        with pytest.raises(DataError, match=rf"^e\.json line {line}: invalid JSON \({what}"):
            load_records(write(f, text))


def test_a_json_file_holding_one_object(tmp_path):
    # {"data": [...]}: the records under one key (read as one record with a field "data", then "field 'text'
    # is missing"); a pretty-printed object was "invalid JSON" on line 1; pandas' default to_json() one record
    f = write(tmp_path / "d.json",
              '{\n "data": [\n  {"text": "a", "label": "pos"},\n  {"text": "b", "label": "neg"}]\n}')
    assert load_records_with_lines(f) == ([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], [3, 4])
    write(f, '{"data": [{"text": "a"}, "b"]}')
    with pytest.raises(DataError, match=r"^d\.json line 1 \(item 2\): expected a JSON object, got str"):
        load_records(f)
    write(f, '{\n  "text": "a",\n  "label": "pos"\n}')
    with pytest.raises(DataError, match=r"^d\.json: one JSON object over several lines \(keys: text, label\); a "
                                        r"\.json file must be an array of records, JSON Lines"):
        load_records(f)
    write(f, json.dumps({"text": {"0": "a", "1": "b"}, "label": {"0": "pos", "1": "neg"}}))
    with pytest.raises(DataError, match=r"one object of columns \(text, label\).*pandas.*orient='records'"):
        load_records(f)
    # one record on one line is JSON Lines, a chat record included (its one key holds a list of objects)
    assert load_records(write(f, '{"text": "a", "label": "pos"}')) == [{"text": "a", "label": "pos"}]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert load_records(write(f, json.dumps(chat))) == [chat]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"^train\.jsonl line 3: invalid JSON"):
        load_records(f)


def test_a_key_given_twice_in_a_json_record_is_refused(tmp_path):
    # json keeps the last value in silence: the record trained under the second label
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n'
                                    '{"text": "great", "label": "pos", "label": "neg"}\n')
    with pytest.raises(DataError, match=r"^d\.jsonl line 2: key 'label' appears twice in one object"):
        load_records(f)
    f = write(tmp_path / "c.jsonl", '{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"^c\.jsonl line 1: key 'content' appears twice"):  # nested objects too
        load_records(f)
    f = write(tmp_path / "d.json", '[\n{"text": "a", "label": "pos"},\n{"text": "b", "text": "c", "label": "neg"}\n]')
    with pytest.raises(DataError, match=r"^d\.json.*key 'text' appears twice in one object"):
        load_records(f)
    from softprompt.data.conversations import read_conversations

    with pytest.raises(DataError, match=r"--messages: unreadable JSON \(key 'role' appears twice"):
        read_conversations('[{"role": "user", "role": "system", "content": "x"}]')


def test_jsonl_non_object_line(tmp_path):
    f = write(tmp_path / "x.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2: expected a JSON object, got list"):
        load_records(f)


def test_csv_and_tsv(tmp_path):
    f = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\n\nlast,pos\n')
    records, lines = load_records_with_lines(f)
    assert records == [{"text": "hello, world", "label": "pos"}, {"text": "two\nlines", "label": "neg"},
                       {"text": "last", "label": "pos"}]
    assert lines == [2, 3, 6]  # the quoted field spans lines 3-4; line 5 is blank
    t = write(tmp_path / "d.tsv", "text\tlabel\na, b\tpos\n")
    assert load_records(t) == [{"text": "a, b", "label": "pos"}]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0c", "\x1e"])
def test_only_newlines_end_a_record_not_unicode_line_separators(tmp_path, sep):
    # json.dumps(ensure_ascii=False) leaves U+2028/U+2029 raw; str.splitlines() would break the line there
    f = write(tmp_path / "d.jsonl", json.dumps({"text": f"a{sep}b", "label": "pos"}, ensure_ascii=False) + "\n"
              + json.dumps({"text": "c", "label": "neg"}) + "\n")
    assert load_records_with_lines(f) == ([{"text": f"a{sep}b", "label": "pos"}, {"text": "c", "label": "neg"}],
                                          [1, 2])
    c = write(tmp_path / "d.csv", f"text\na{sep}b\nc\n")
    assert load_records_with_lines(c) == ([{"text": f"a{sep}b"}, {"text": "c"}], [2, 3])
    t = write(tmp_path / "d.tsv", f"text\tlabel\na{sep}b\tpos\n")
    assert load_records(t) == [{"text": f"a{sep}b", "label": "pos"}]


def test_json_that_parses_but_cannot_become_a_value_is_a_data_error(tmp_path):
    from softprompt.data.conversations import read_conversations

    huge = "1" * 5000  # json.loads: a plain ValueError (over 4300 digits), not a JSONDecodeError
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "n": ' + huge + "}\n")
    with pytest.raises(DataError, match=r"^d\.jsonl line 2: unreadable JSON \(Exceeds the limit \(4300 digits\)"):
        load_records(f)
    a = write(tmp_path / "d.json", "[" * 100000)  # RecursionError
    with pytest.raises(DataError, match=r"^d\.json: unreadable JSON \(nested too deeply\)"):
        load_records(a)
    with pytest.raises(DataError, match=r"--messages: unreadable JSON \(nested too deeply\)"):
        read_conversations("[" * 100000)
    c = write(tmp_path / "chat.json", '[{"role": "user", "content": "x", "n": ' + huge + "}]")
    with pytest.raises(DataError, match=r"chat\.json: unreadable JSON \(Exceeds the limit"):
        read_conversations(str(c))


def test_a_byte_order_mark_is_not_part_of_the_first_text(tmp_path):
    from softprompt.data.conversations import read_conversations
    from softprompt.data.corpus import read_documents
    from softprompt.workflows.distilling import read_inputs

    (tmp_path / "in.txt").write_text("\ufefffirst input\nsecond\u2028still second\n", encoding="utf-8")
    assert read_inputs(tmp_path / "in.txt") == ["first input", "second\u2028still second"]
    (tmp_path / "corpus.txt").write_text("\ufeffone doc\n\nanother\n", encoding="utf-8")
    assert read_documents(tmp_path / "corpus.txt") == ["one doc", "another"]
    (tmp_path / "chat.json").write_text('\ufeff[{"role": "user", "content": "hi"}]', encoding="utf-8")
    assert read_conversations(str(tmp_path / "chat.json")) == [[{"role": "user", "content": "hi"}]]


def test_csv_ragged_row_names_line(tmp_path):
    f = write(tmp_path / "dev.csv", "text,label\nok,pos\ntoo,many,fields\n")
    with pytest.raises(DataError) as e:
        load_records(f)
    assert str(e.value) == "dev.csv line 3: expected 2 fields (text, label), got 3"


@pytest.mark.parametrize("name,sep", [("p.csv", ",")])
def test_a_stray_quote_is_an_error_naming_its_line_not_one_record_holding_the_rest_of_the_file(tmp_path, name, sep):
    # the default csv reader read everything after an unclosed quote into one field: one record, exit 0
    f = write(tmp_path / name, f"label{sep}text\nneg{sep}fine\npositive{sep}\"Great movie\nnegative{sep}Bad\n")
    with pytest.raises(DataError, match=rf"{name} line 3: malformed row \(unexpected end of data\)"):
        load_records(f)
    f = write(tmp_path / name, f"label{sep}text\npositive{sep}\"Great\" movie\n")  # text after the closing quote
    with pytest.raises(DataError, match=rf"{name} line 2: malformed row .*a quote inside it is written twice"):
        load_records(f)
    f = write(tmp_path / name, f"label{sep}text\npositive{sep}\"say \"\"hi\"\"\nmore\"\n")
    assert load_records(f) == [{"label": "positive", "text": 'say "hi"\nmore'}]  # quoted fields still work


def test_tsv_has_no_quoting_a_quote_is_a_character(tmp_path, caplog):
    # read with CSV's quoting, a field starting with a quote swallowed the tab and line break after it: two
    # records became one, labelled with the second's label
    f = write(tmp_path / "m.tsv", 'text\tlabel\n"Best film ever\tpositive\nIt was 12"\tnegative\nok\tpositive\n')
    assert load_records_with_lines(f) == ([{"text": '"Best film ever', "label": "positive"},
                                           {"text": 'It was 12"', "label": "negative"},
                                           {"text": "ok", "label": "positive"}], [2, 3, 4])
    f = write(tmp_path / "q.tsv", 'text\tlabel\n"Wow" said no one\tneg\n"Wow"\tneg\nsay "hi"\tpos\n')
    with caplog.at_level("WARNING", logger="softprompt"):
        assert [r["text"] for r in load_records(f)] == ['"Wow" said no one', '"Wow"', 'say "hi"']
    assert not caplog.text  # nothing here looks written by a CSV writer
    # pandas to_csv(sep="\t") quotes a field with a quote in it: its quotes stay in the text, said once
    f = write(tmp_path / "p.tsv", 'text\tlabel\n"say ""hi"""\tpos\n"a ""b"" c"\tneg\n')
    with caplog.at_level("WARNING", logger="softprompt"):
        assert load_records(f)[0]["text"] == '"say ""hi"""'
    assert caplog.text.count("p.tsv line 2: a field is wrapped in double quotes") == 1
    f = write(tmp_path / "r.tsv", 'text\tlabel\n"a\tb"\tpos\n')
    with pytest.raises(DataError, match=r"r\.tsv line 2: expected 2 fields .*got 3 \(a \.tsv file has no quoting"):
        load_records(f)


@pytest.mark.parametrize("name,sep", [("cat.csv", ","), ("cat.tsv", "\t")])
def test_a_row_repeating_the_header_is_refused(tmp_path, name, sep):
    # `cat a.csv b.csv`: the second header became a record (question "question", answer "answer")
    f = write(tmp_path / name, f"question{sep}answer\nq1{sep}a1\n\nquestion{sep} answer\nq2{sep}a2\n")
    with pytest.raises(DataError, match=rf"^{name} line 4: the header row again \(question, answer\), not a record"):
        load_records(f)


@pytest.mark.parametrize("name,sep", [("long.csv", ","), ("long.tsv", "\t")])
def test_a_field_over_128k_characters_loads(tmp_path, name, sep):
    # the csv module's default field limit (131,072) refused a long document as a "malformed row"
    text = "word " * 40000
    f = write(tmp_path / name, f"text{sep}label\n{text}{sep}pos\n")
    assert load_records(f) == [{"text": text, "label": "pos"}]


def test_csv_bad_header(tmp_path):
    f = write(tmp_path / "d.csv", "text,text,\n1,2,3\n")
    with pytest.raises(DataError, match=r"d\.csv line 1: bad header: empty column name at position 3; "
                                        r"duplicate column name\(s\) text"):
        load_records(f)


def test_unsupported_missing_and_empty_files(tmp_path):
    supported = r"supported: \.jsonl, \.json, \.csv, \.tsv"
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; " + supported):
        load_records(tmp_path / "a.txt")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: contains no records"):
        load_records(write(tmp_path / "empty.jsonl", "\n\n"))


# --- TaskFormat -----------------------------------------------------------------------------------


def test_format_properties():
    assert SENTIMENT.fields == ["text"]
    assert SENTIMENT.is_classification
    assert SENTIMENT.labels == ["pos", "neg"]
    assert SENTIMENT.label_texts == [" great", " terrible"]
    gen = TaskFormat("Q: {a} {b} {a} {{literal}}", "answer")
    assert gen.fields == ["a", "b"] and not gen.is_classification and gen.labels == []


def test_render_classification_and_generation():
    assert SENTIMENT.render({"text": "Fun.", "label": "pos", "id": 3}) == \
        Example("Review: Fun.\nSentiment:", " great", "pos")
    gen = TaskFormat("Country: {country}\nCapital:", "capital", target_prefix="")
    assert gen.render({"country": "France", "capital": " Paris \n"}) == \
        Example("Country: France\nCapital:", "Paris", None)
    numeric = TaskFormat("{text}", "label", {"1": "yes", "0": "no"})
    assert numeric.render({"text": "x", "label": 1}).label == "1"  # JSON ints match string labels


def test_render_errors_name_where_and_field():
    with pytest.raises(DataError) as e:
        SENTIMENT.render({"text": "x", "id": 1}, "train.jsonl line 7")
    assert str(e.value) == "train.jsonl line 7: field 'label' is missing (have: text, id)"
    with pytest.raises(DataError) as e:
        SENTIMENT.render({"text": "x", "label": "neutral"}, "dev.csv line 2")
    assert str(e.value) == ("dev.csv line 2: field 'label' has label 'neutral', which the verbalizer does "
                            "not know (known: pos, neg)")
    with pytest.raises(DataError, match="field 'text' is null"):
        SENTIMENT.render({"text": None, "label": "pos"})
    with pytest.raises(DataError, match="field 'capital' is empty"):
        TaskFormat("{country}", "capital").render({"country": "X", "capital": "  "})


def test_format_validation_reports_all_problems():
    with pytest.raises(DataError) as e:
        TaskFormat("no placeholder", "", {"a": "", "b": "x", "c": "x"})
    msg = str(e.value)
    assert "has no {field} placeholder" in msg
    assert "--target-field must be a non-empty field name" in msg
    assert "--verbalizer text for label 'a' is empty" in msg
    assert "several labels to the same text: 'x'" in msg
    with pytest.raises(DataError, match="must be a field name"):
        TaskFormat("{0} {x.y}", "label")


@pytest.mark.parametrize("name", ["Review Text", "review-body", "naïve", "q#1"])
def test_a_column_name_with_spaces_or_hyphens_is_a_field(name):
    # refused as "letters, digits, underscores" though format_map fills them
    fmt = TaskFormat(f"R: {{{name}}}\nS:", "label", {"pos": "good"})
    assert fmt.fields == [name]
    assert fmt.render({name: "fine", "label": "pos"}).source == "R: fine\nS:"


@pytest.mark.parametrize("template, problem", [
    ("{a.b}", "placeholder {a.b} must be a field name"), ("{a[0]}", "placeholder {a[0]} must be a field name"),
    ("{0}", "placeholder {0} must be a field name"), ("{ text }", "placeholder { text } must be a field name"),
    ("{}", "placeholder {} must be a field name"),
    ('Answer as JSON {"label": 0}. {text}',
     'placeholder {"label": 0} is not a field name: write a literal brace twice, {{ and }} (e.g. {{"label": 0}})'),
])
def test_placeholders_that_are_not_field_names_are_refused_with_a_hint(template, problem):
    with pytest.raises(DataError, match=re.escape(problem)):
        TaskFormat(template, "label")
    with pytest.raises(DataError, match="uses the target field {label}"):
        TaskFormat("{text} {label}", "label")
    with pytest.raises(DataError, match="malformed"):
        TaskFormat("{text", "label")


def test_validate_records_lists_problems_with_lines():
    records = [{"text": "a", "label": "pos"}, {"text": "b"}, {"text": "c", "label": "meh"}]
    with pytest.raises(DataError) as e:
        SENTIMENT.validate_records(records, "train.jsonl", lines=[1, 3, 4])
    assert str(e.value).splitlines() == [
        "train.jsonl: 2 of 3 records are invalid:",
        "  train.jsonl line 3: field 'label' is missing (have: text)",
        "  train.jsonl line 4: field 'label' has label 'meh', which the verbalizer does not know "
        "(known: pos, neg)",
    ]
    many = [{"text": str(i)} for i in range(25)]
    with pytest.raises(DataError) as e:
        SENTIMENT.validate_records(many, "rt/train")
    lines = str(e.value).splitlines()
    assert lines[0] == "rt/train: 25 of 25 records are invalid:"
    assert lines[1] == "  rt/train record 1: field 'label' is missing (have: text)"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 5 more"
    assert SENTIMENT.validate_records(records[:1], "x") == [Example("Review: a\nSentiment:", " great", "pos")]


# --- parse_verbalizer / load_task with files --------------------------------------------------------


def test_parse_verbalizer():
    assert parse_verbalizer("positive=great, negative = terrible") == {"positive": "great",
                                                                      "negative": "terrible"}
    assert parse_verbalizer({"a": "x"}) == {"a": "x"}
    with pytest.raises(DataError, match=r"--verbalizer 'pos=great,neg': 'neg' is not label=text"):
        parse_verbalizer("pos=great,neg")
    with pytest.raises(DataError, match="label 'a' appears twice"):
        parse_verbalizer("a=x,a=y")


def test_load_task_files_need_template_and_target_field(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"q": "2+2", "a": "4"}\n')
    with pytest.raises(DataError) as e:
        load_task(train_file=f)
    assert "--template is required" in str(e.value) and "--target-field is required" in str(e.value)
    with pytest.raises(DataError, match="no data: pass --dataset"):
        load_task(template="{q}", target_field="a")


def test_a_stored_prompts_target_prefix_is_kept_when_its_task_is_loaded(tmp_path):
    """eval scored a prompt saved with another target prefix (the API allows one) on " label" targets."""
    from softprompt.config import DataArgs
    from softprompt.store.task_record import TaskRecord
    from softprompt.workflows.loading import load_task_from_args

    dev = write(tmp_path / "dev.csv", "text,label\nx,pos\n")
    record = TaskRecord.parse({"template": "{text} ->", "target_field": "label", "verbalizer": {"pos": "good"},
                               "target_prefix": "\n"}, "test")
    task = load_task_from_args(DataArgs(test_file=str(dev)), record)
    assert task.format.target_prefix == "\n" and task.examples("test") == [Example("x ->", "\ngood", "pos")]


def test_load_task_from_files(tmp_path):
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    dev = write(tmp_path / "dev.csv", "text,label\nx,pos\ny,neg\n")
    task = load_task(train_file=train, validation_file=dev, template="{text} ->", target_field="label",
                     verbalizer="pos=good,neg=bad", max_samples={"train": 4})
    assert task.format.is_classification and task.format.label_texts == [" good", " bad"]
    assert list(task.splits) == ["train", "validation"]
    assert task.examples("validation") == [Example("x ->", " good", "pos"), Example("y ->", " bad", "neg")]
    train_ex = task.examples("train")
    again = load_task(train_file=train, template="{text} ->", target_field="label",
                      verbalizer="pos=good,neg=bad", max_samples={"train": 4}).examples("train")
    assert len(train_ex) == 4 and train_ex == again  # seeded subset, deterministic
    sources = [e.source for e in train_ex]
    assert sources == sorted(sources, key=lambda s: int(s[1:-3]))  # original order kept
    with pytest.raises(DataError, match=r"no 'test' split \(have: train, validation\); pass --test-file"):
        task.examples("test")


def test_load_task_reports_file_errors(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "??"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: field 'label' has label '\?\?'"):
        load_task(train_file=f, template="{text}", target_field="label", verbalizer={"pos": "good"})
    with pytest.raises(DataError, match="--max-samples names unknown split 'valid'"):
        load_task(train_file=f, template="{text}", target_field="label", max_samples={"valid": 3})


def test_json_numbers_reach_the_template_as_the_file_wrote_them(tmp_path):
    # 19.90 became "19.9", 0.00001 "1e-05" and 5E3 "5000.0": the same data as JSONL and as CSV trained on other text
    recs = '{"text": "price 19.90", "n": 0.00001, "answer": 19.90}\n{"text": "x", "n": 5E3, "answer": 7}\n'
    (tmp_path / "d.jsonl").write_text(recs)
    (tmp_path / "d.json").write_text("[" + recs.strip().replace("\n", ",") + "]")
    (tmp_path / "d.csv").write_text("text,n,answer\nprice 19.90,0.00001,19.90\nx,5E3,7\n")
    rendered = []
    for name in ("d.jsonl", "d.json", "d.csv"):
        task = load_task(train_file=tmp_path / name, template="Q: {text} {n}", target_field="answer")
        rendered.append([(ex.source, ex.target) for ex in task.examples("train")])
    assert rendered[0] == rendered[1] == rendered[2] == [("Q: price 19.90 0.00001", " 19.90"), ("Q: x 5E3", " 7")]


def test_json_values_that_are_not_text_are_refused_and_booleans_read_as_json_writes_them():
    """A list or object field was rendered as Python's repr (a template got "['a', 'b']", a target
    " ['Paris', 'Lyon']") and NaN as "nan"; a JSON label true read as "True", unknown to a true/false verbalizer."""
    from softprompt.data import TaskFormat

    cls = TaskFormat("Q: {text}", "label", {"true": "yes", "false": "no"})
    assert [cls.render({"text": "x", "label": v}).target for v in (True, False, "true")] == [" yes", " no", " yes"]
    gen = TaskFormat("Q: {text} {n}", "answer")
    ex = gen.render({"text": "x", "n": 3, "answer": 2.5})
    assert (ex.source, ex.target) == ("Q: x 3", " 2.5")
    for record, field, kind in [({"text": ["a", "b"], "n": 1, "answer": "y"}, "text", "list"),
                                ({"text": "x", "n": {"k": 1}, "answer": "y"}, "n", "dict"),
                                ({"text": "x", "n": float("nan"), "answer": "y"}, "n", "a non-finite number"),
                                ({"text": "x", "n": 1, "answer": ["Paris", "Lyon"]}, "answer", "list")]:
        with pytest.raises(DataError, match=re.escape(f"d.jsonl line 4: field {field!r} is {kind} (")):
            gen.render(record, "d.jsonl line 4")


def test_a_held_out_file_that_repeats_training_examples_is_warned_about(tmp_path, caplog):
    """--test-file d.jsonl beside --train-file d.jsonl (or files sharing records) reported training accuracy as
    test accuracy, with no sign of it."""
    import logging

    recs = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[4:] + [{"text": "new",
                                                                                        "label": "pos"}]))
    flags = dict(template="R: {text}", target_field="label", verbalizer="pos=good,neg=bad")
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        load_task(train_file=tmp_path / "d.jsonl", validation_file=tmp_path / "v.jsonl",
                  test_file=tmp_path / "d.jsonl", **flags)
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("2 of the 3 validation examples also appear in the train split") for m in warned)
    assert any(m.startswith("6 of the 6 test examples also appear in the train split") for m in warned)
    # and a test split that repeats validation examples: the best step was selected on them
    assert any(m.startswith("2 of the 6 test examples also appear in the validation split") for m in warned)
    caplog.clear()
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "unseen", "label": "neg"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        load_task(train_file=tmp_path / "d.jsonl", test_file=tmp_path / "t.jsonl", **flags)
    assert not [r for r in caplog.records if "also appear" in r.getMessage()]


def test_labels_without_training_examples_are_warned_about(tmp_path, caplog):
    """A verbalizer label absent from train, or validation/test labels train has none of, passed in silence."""
    import logging

    (tmp_path / "tr.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n')
    (tmp_path / "va.jsonl").write_text('{"text": "c", "label": "neg"}\n{"text": "d", "label": "neu"}\n')
    (tmp_path / "te.jsonl").write_text('{"text": "e", "label": "pos"}\n')
    flags = dict(template="R: {text}", target_field="label", verbalizer="pos=good,neg=bad,neu=meh")
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        load_task(train_file=tmp_path / "tr.jsonl", validation_file=tmp_path / "va.jsonl",
                  test_file=tmp_path / "te.jsonl", **flags)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["the train split has no example of verbalizer label(s) 'neg', 'neu': the prompt never "
                      "learns to answer them", "the validation split holds label(s) 'neg', 'neu' that no train "
                      "example has"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        load_task(train_file=tmp_path / "te.jsonl", test_file=tmp_path / "tr.jsonl", **{**flags, "verbalizer": "pos=x"})
    assert not caplog.records


def test_a_chat_template_for_a_template_task_is_refused(tmp_path):
    # it was silently unused: the user believed the task ran with their chat template
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a", "label": "pos"}) + "\n")
    with pytest.raises(DataError, match="--chat-template renders chat records"):
        load_task(train_file=tmp_path / "d.jsonl", template="R: {text}", target_field="label",
                  chat_template="{{ messages }}")
    with pytest.raises(DataError, match="--chat-template renders chat records"):
        load_task(dataset="rotten_tomatoes", chat_template="{{ messages }}")


def test_records_with_an_empty_template_field_are_counted_in_a_warning(tmp_path, caplog):
    # a CSV's missing text (",positive") rendered "R: " with nothing in it, where JSONL's null is refused
    import logging

    (tmp_path / "d.csv").write_text("text,label\ngood film,pos\n,neg\n   ,pos\nbad,neg\n")
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        task = load_task(train_file=tmp_path / "d.csv", template="R: {text}", target_field="label",
                         verbalizer="pos=good,neg=bad")
    assert len(task.examples("train")) == 4
    assert any("2 of the 4 records have an empty 'text' field" in r.getMessage() for r in caplog.records)
