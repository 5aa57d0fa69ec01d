"""Tests of sorsa/tasks/data.py: loading training files (and their error messages), the reference's
tokenization (label masking, BOS/EOS, per-part truncation) and the padding collator."""
import json

import pytest
import torch

from sorsa.tasks.builtin import build_tokenizer
from sorsa.tasks.data import (IGNORE_INDEX, MATH_TRAIN_PROMPT, CausalLMCollator, DataError, load_train_dataset, pad_collate, tokenize_train_dataset)

ROWS = [
    {"query": "Tom has 3 apples. He buys 2 more. How many apples does Tom have now?",
     "response": "3 + 2 = 5\nThe answer is: 5"},
    {"query": "Mia has 9 pens. She gives 4 pens to Ben. How many pens does Mia have left?",
     "response": "9 - 4 = 5\nThe answer is: 5"},
    {"query": "Sam buys 2 boxes of eggs. Each box has 6 eggs. How many eggs does Sam buy?",
     "response": "2 * 6 = 12\nThe answer is: 12"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- loading

def test_load_jsonl_json_and_parquet_with_split(tmp_path):
    jsonl = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ds = load_train_dataset("metamath", train_file=str(jsonl))
    assert ds.column_names == ["query", "response"] and ds[1] == ROWS[1]
    # The reference's slice syntax, with or without the split name.
    assert [r["query"] for r in load_train_dataset("metamath", "[:2]", jsonl)] == [r["query"] for r in ROWS[:2]]
    assert len(load_train_dataset("metamath", "train[1:]", jsonl)) == 2
    # A .json file holding one list (the hub's MetaMathQA layout); extra columns are dropped.
    (tmp_path / "train.json").write_text(json.dumps([dict(r, type="GSM_Rephrased") for r in ROWS]))
    assert load_train_dataset("metamath", None, tmp_path / "train.json")[2] == ROWS[2]
    code_rows = [{"query": r["query"], "answer": r["response"]} for r in ROWS]
    ds = load_train_dataset("code", None, write_jsonl(tmp_path / "code.jsonl", code_rows))
    ds.to_parquet(str(tmp_path / "code.parquet"))
    assert load_train_dataset("code", "[-1:]", tmp_path / "code.parquet")[0] == code_rows[-1]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"training file .*nope\.jsonl does not exist"):
        load_train_dataset("metamath", train_file=str(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path):
    (tmp_path / "train.csv").write_text("query,response\n")
    with pytest.raises(DataError, match=r"train\.csv: unknown extension '\.csv'; use one of \.json, \.jsonl, \.parquet"):
        load_train_dataset("metamath", train_file=tmp_path / "train.csv")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: the file has no rows"):
        load_train_dataset("metamath", train_file=tmp_path / "empty.jsonl")


def test_broken_line_is_named(tmp_path):
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), '{"query": "x", "response": ', json.dumps(ROWS[2])]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_train_dataset("metamath", train_file=tmp_path / "broken.jsonl")
    message = str(err.value)
    assert "broken.jsonl: line 4 is not valid JSON" in message  # the blank line 2 still counts
    assert "\n" not in message


def test_line_that_is_not_an_object(tmp_path):
    (tmp_path / "list.jsonl").write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl: line 2 is not a JSON object"):
        load_train_dataset("metamath", train_file=tmp_path / "list.jsonl")


def test_missing_column_names_it_and_lists_found(tmp_path):
    gsm_rows = [{"question": r["query"], "answer": r["response"]} for r in ROWS]
    path = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows)
    with pytest.raises(DataError) as err:
        load_train_dataset("metamath", train_file=path)
    assert str(err.value) == (f"{path}: missing column(s) 'query', 'response' needed by the 'metamath' "
                              "dataset; found: 'question', 'answer'")
    # The code set needs "answer", not "response".
    with pytest.raises(DataError, match=r"missing column\(s\) 'answer' needed by the 'code' dataset; "
                                        r"found: 'query', 'response'"):
        load_train_dataset("code", train_file=write_jsonl(tmp_path / "m.jsonl", ROWS))


def test_column_missing_or_not_text_in_a_later_row(tmp_path):
    path = write_jsonl(tmp_path / "late.jsonl", [ROWS[0], {"query": "q"}, ROWS[2]])
    with pytest.raises(DataError, match=r"late\.jsonl: line 2: missing column\(s\) 'response'.*found: 'query'"):
        load_train_dataset("metamath", train_file=path)
    path = write_jsonl(tmp_path / "null.jsonl", [ROWS[0], ROWS[1], {"query": "q", "response": None}])
    with pytest.raises(DataError, match=r"null\.jsonl: line 3: column 'response' must be text, got NoneType"):
        load_train_dataset("metamath", train_file=path)


def test_bad_name_and_split(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match=r"unknown training dataset 'gsm'; choose one of: metamath, code"):
        load_train_dataset("gsm", train_file=path)
    with pytest.raises(DataError, match=r"split 'test\[:5\]' not understood"):
        load_train_dataset("metamath", "test[:5]", path)
    with pytest.raises(DataError, match=r"the split leaves no rows \(the file has 3\)"):
        load_train_dataset("metamath", "[5:]", path)


# ----------------------------------------------------------------------------- tokenization

def test_labels_mask_exactly_the_prompt_and_keep_response_and_eos(tokenizer, tmp_path):
    ds = load_train_dataset("metamath", train_file=write_jsonl(tmp_path / "t.jsonl", ROWS))
    out = tokenize_train_dataset(ds, tokenizer, "metamath", max_length=512)
    assert out.column_names == ["input_ids", "labels", "attention_mask"]
    for row, src in zip(out, ROWS):
        prompt = ids(tokenizer, "<s>Below is an instruction that describes a task. Write a response that "
                                "appropriately completes the request.\n\n### Instruction:\n"
                                f"{src['query']}\n\n### Response:")
        response = ids(tokenizer, src["response"]) + [tokenizer.eos_token_id]
        n = len(prompt)
        assert row["input_ids"] == prompt + response
        assert row["labels"][:n] == [IGNORE_INDEX] * n  # every prompt token masked ...
        assert row["labels"][n:] == response  # ... and no response token, EOS included
        assert row["attention_mask"] == [1] * (n + len(response))
        # BOS opens the prompt exactly once; EOS closes the response exactly once.
        assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"].count(tokenizer.bos_token_id) == 1
        assert row["input_ids"][-1] == tokenizer.eos_token_id and row["input_ids"].count(tokenizer.eos_token_id) == 1


def test_code_template_has_no_bos_and_ends_with_eos(tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"query": "Add two numbers.", "answer": "def add(a, b):\n    return a + b"}])
    row = tokenize_train_dataset(ds, tokenizer, "code", max_length=512)[0]
    prompt = ids(tokenizer, "@@ Instruction\nAdd two numbers.\n\n@@ Response\n")
    assert row["input_ids"][:len(prompt)] == prompt and tokenizer.bos_token_id not in row["input_ids"]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tokenizer, "def add(a, b):\n    return a + b") + [
        tokenizer.eos_token_id]


def test_prompt_and_response_are_truncated_separately(tokenizer):
    import datasets

    long_query = "Tom has 3 apples. " * 40  # far over 50 tokens
    long_response = "3 + 2 = 5\n" * 40
    ds = datasets.Dataset.from_list([{"query": long_query, "response": long_response},
                                     {"query": long_query, "response": "5"}])
    out = tokenize_train_dataset(ds, tokenizer, "metamath", max_length=50)
    full_prompt = ids(tokenizer, "<s>Below is an instruction that describes a task. Write a response that "
                                 "appropriately completes the request.\n\n### Instruction:\n"
                                 f"{long_query}\n\n### Response:")
    full_response = ids(tokenizer, long_response) + [tokenizer.eos_token_id]
    long_row = out[0]
    # Each part keeps its first 50 tokens: 100 in all (up to 2 x max_length, as the reference),
    # and the over-long response loses its EOS.
    assert len(long_row["input_ids"]) == 100
    assert long_row["input_ids"] == full_prompt[:50] + full_response[:50]
    assert long_row["labels"] == [IGNORE_INDEX] * 50 + full_response[:50]
    assert tokenizer.eos_token_id not in long_row["input_ids"]
    # A short response next to a truncated prompt is kept whole.
    short_row = out[1]
    assert short_row["input_ids"][-2:] == ids(tokenizer, "5") + [tokenizer.eos_token_id]
    assert len(short_row["input_ids"]) == 50 + 2


def test_tokenize_rejects_wrong_columns(tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"missing column\(s\) 'query', 'response'.*found: 'question', 'answer'"):
        tokenize_train_dataset(ds, tokenizer, "metamath", max_length=16)


# ----------------------------------------------------------------------------- collator

def test_collator_right_pads_with_pad_id_ignore_index_and_zero_mask():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
                {"input_ids": [8], "labels": [8], "attention_mask": [1]}]
    batch = CausalLMCollator(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    padded = pad_collate(features, pad_token_id=3, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 3], [8, 3, 3, 3]]
    assert padded["labels"][1].tolist() == [8, -100, -100, -100]


def test_collator_needs_a_pad_id():
    with pytest.raises(DataError, match="no pad token id"):
        CausalLMCollator(pad_token_id=None)


def test_collator_feeds_a_tokenized_dataset(tokenizer, tmp_path):
    ds = load_train_dataset("metamath", train_file=write_jsonl(tmp_path / "t.jsonl", ROWS))
    out = tokenize_train_dataset(ds, tokenizer, "metamath", max_length=512)
    batch = CausalLMCollator(tokenizer.pad_token_id)([out[i] for i in range(len(out))])
    lengths = [len(r) for r in out["input_ids"]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_world_tokenizer_responses_end_with_the_end_of_text_id():
    """The RWKV world tokenizer's EOS (id 0) has no text, so its id is appended to each response."""
    from datasets import Dataset

    from sorsa.rwkv6 import RWKVWorldTokenizer

    tok = RWKVWorldTokenizer()
    ds = Dataset.from_list([{"query": "1+1?", "response": "The answer is: 2"}])
    row = tokenize_train_dataset(ds, tok, "metamath", max_length=64)[0]
    prompt_len = len(tok.encode(MATH_TRAIN_PROMPT.format(bos="", query="1+1?")))
    assert row["input_ids"][-1] == 0 and row["labels"][-1] == 0
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert tok.decode(row["input_ids"][prompt_len:]) == "The answer is: 2"
