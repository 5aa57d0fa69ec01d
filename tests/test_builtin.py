"""Tests of sorsa/tasks/builtin.py: the tokenizer is lossless on the data and the templates, the
generator and the model are deterministic, the model directory loads with plain transformers,
and the short pre-training clearly beats the random initialisation."""
import json
import re

import pytest
import torch

from sorsa.tasks import builtin
from sorsa.tasks.builtin import (BUILTIN_DATA, BUILTIN_DATA_EASY, BUILTIN_MODEL, build_model, build_tokenizer, heldout_loss, make_problems, materialize_dataset, materialize_model, pretrain, resolve_builtin)
from sorsa.tasks.data import (CODE_TRAIN_PROMPT, MATH_TRAIN_PROMPT, humaneval_test_prompt, load_train_dataset, math_test_prompt, tokenize_train_dataset)

HUMANEVAL_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n'


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def all_texts():
    """Every kind of string the built-in tokenizer must reproduce exactly."""
    texts = [MATH_TRAIN_PROMPT.format(bos="", query="What is 2 + 2?"),
             math_test_prompt("What is 2 + 2?"),
             CODE_TRAIN_PROMPT.format(query="Write add(a, b)."),
             humaneval_test_prompt(HUMANEVAL_PROMPT),
             "Let's think step by step. Is it 99%? {x: [1, 2]} ~ `q` & | ^ \\ @ $\t\n\n"]
    for level in (1, 2):
        for p in make_problems(50, seed=3, level=level):
            texts += [*p.metamath().values(), *p.gsm8k().values()]
    return texts


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_data_and_templates_exactly(tokenizer):
    for text in all_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0, 1, 2, 3]
    # Like Llama's tokenizer: BOS is prepended when special tokens are added, never EOS.
    assert tokenizer("2 + 2")["input_ids"] == [1] + tokenizer("2 + 2", add_special_tokens=False)["input_ids"]
    # The BOS / EOS strings inside a training text become the special ids, not characters.
    ids = tokenizer("<s>Below is</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 4
    # Template words are single tokens; numbers are spelled digit by digit.
    assert tokenizer.tokenize(" instruction 127") == [" instruction", " ", "1", "2", "7"]
    assert tokenizer.decode(tokenizer("é", add_special_tokens=False)["input_ids"]) == "<unk>"


def test_sequences_with_the_template_stay_short(tokenizer):
    import datasets

    for level in (1, 2):
        rows = [p.metamath() for p in make_problems(300, seed=1, level=level)]
        out = tokenize_train_dataset(datasets.Dataset.from_list(rows), tokenizer, "metamath", 512)
        lengths = [len(x) for x in out["input_ids"]]
        assert 70 <= min(lengths) and max(lengths) <= 128, (level, min(lengths), max(lengths))
        prompts = [len(tokenizer(math_test_prompt(p.question))["input_ids"]) for p in make_problems(100, 1, level)]
        assert max(prompts) <= 80


# ----------------------------------------------------------------------------- generator

def test_problems_are_deterministic_distinct_and_correct():
    a, b = make_problems(200, seed=5, level=2), make_problems(200, seed=5, level=2)
    assert a == b
    assert a != make_problems(200, seed=6, level=2)
    assert len({p.question for p in a}) == 200
    for level in (1, 2):
        for p in make_problems(200, seed=5, level=level):
            row, test_row = p.metamath(), p.gsm8k()
            assert row["query"] == test_row["question"] == p.question
            assert row["response"].endswith(f"\nThe answer is: {p.answer}")
            assert test_row["answer"].endswith(f"\n#### {p.answer}")
            # Every equation is right, and the last one gives the answer.
            equations = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", row["response"], flags=re.M)
            assert len(equations) == (1 if level == 1 else len(p.steps) // 2)
            for x, op, y, z in equations:
                assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] == int(z)
            assert int(equations[-1][3]) == p.answer > 0


def test_levels_differ():
    easy = {p.question.split(".")[1] for p in make_problems(100, 0, 1)}
    hard = {p.question.split(".")[1] for p in make_problems(100, 0, 2)}
    assert not any("and gives" in q for q in easy) and any("and gives" in q for q in hard)
    with pytest.raises(ValueError, match="level must be one of"):
        make_problems(1, 0, level=3)


def test_materialize_dataset_is_deterministic_and_disjoint(tmp_path):
    train, test = materialize_dataset(tmp_path / "a", n_train=300, n_test=50, seed=4)
    train2, test2 = materialize_dataset(tmp_path / "b", n_train=300, n_test=50, seed=4)
    assert train.read_bytes() == train2.read_bytes() and test.read_bytes() == test2.read_bytes()
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(train_rows) == 300 and len(test_rows) == 50
    assert set(train_rows[0]) == {"query", "response"} and set(test_rows[0]) == {"question", "answer"}
    assert not {r["query"] for r in train_rows} & {r["question"] for r in test_rows}
    # The train file is a valid MetaMathQA file for the loader.
    assert load_train_dataset("metamath", "[:10]", train)[0] == train_rows[0]


def test_resolve_builtin_data_and_unknown_name(tmp_path):
    train = resolve_builtin(BUILTIN_DATA, tmp_path, split="train")
    test = resolve_builtin(BUILTIN_DATA, tmp_path, split="test")
    assert train.endswith("train.jsonl") and test.endswith("test.jsonl")
    assert "and gives" in open(train).read() or " boxes of " in open(train).read()
    easy = resolve_builtin(BUILTIN_DATA_EASY, tmp_path, split="test")
    assert easy != test and "#### " in open(easy).readline()
    with pytest.raises(ValueError, match="unknown built-in name 'builtin:nope'"):
        resolve_builtin("builtin:nope", tmp_path)
    with pytest.raises(ValueError, match="split for builtin:arithmetic must be 'train' or 'test'"):
        resolve_builtin(BUILTIN_DATA, tmp_path, split="valid")


# ----------------------------------------------------------------------------- model

def test_model_init_and_pretraining_are_deterministic(tokenizer):
    states = []
    for _ in range(2):
        model = build_model(tokenizer, seed=3)
        pretrain(model, tokenizer, steps=3, seed=3, batch_size=4, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = build_model(tokenizer, seed=4).state_dict()
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"],
                           build_model(tokenizer, seed=3).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_model_dir_loads_with_plain_transformers(builtin_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "builtin.json"):
        assert (builtin_model_dir / name).is_file(), name
    assert not list(builtin_model_dir.parent.glob(".*tmp*"))  # no temporary directory left behind
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir)
    loaded_tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(loaded_tok) == len(tokenizer)
    assert 64 <= model.config.hidden_size <= 128 and 2 <= model.config.num_hidden_layers <= 4
    text = math_test_prompt(make_problems(1, 0, 1)[0].question)
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(loaded_tok(text, add_special_tokens=False)["input_ids"]) == text
    # Greedy generation runs and stops at EOS or the budget.
    enc = loaded_tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=loaded_tok.pad_token_id)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 8


def test_pretrained_base_beats_random_init(builtin_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    random_loss = heldout_loss(build_model(tokenizer), tokenizer)
    trained_loss = heldout_loss(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tokenizer)
    assert random_loss > 5.0  # about ln(vocab) = ln(295) = 5.69 at init
    assert trained_loss < 0.7 * random_loss, (random_loss, trained_loss)
    marker = json.loads((builtin_model_dir / "builtin.json").read_text())
    assert marker["loss_after"] == pytest.approx(trained_loss, rel=1e-4)


def test_materialize_skips_a_complete_dir_and_rebuilds_a_stale_one(builtin_model_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pre-training ran although the directory was complete")

    monkeypatch.setattr(builtin, "pretrain", fail)
    before = (builtin_model_dir / "model.safetensors").stat().st_mtime_ns
    steps = json.loads((builtin_model_dir / "builtin.json").read_text())["pretrain_steps"]
    assert materialize_model(builtin_model_dir, pretrain_steps=steps) == builtin_model_dir
    assert (builtin_model_dir / "model.safetensors").stat().st_mtime_ns == before
    # Other settings than the ones on disk: the directory is rebuilt (here the rebuild fails midway,
    # and the complete old directory is left as it was, with no temporary directory).
    with pytest.raises(AssertionError, match="pre-training ran"):
        materialize_model(builtin_model_dir, pretrain_steps=steps + 1)
    assert (builtin_model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert not list(builtin_model_dir.parent.glob(".*tmp*"))


def test_materialize_refuses_a_foreign_directory_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a built-in model directory"):
        materialize_model(foreign, pretrain_steps=1)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def interrupted_save(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "pretrain", lambda *a, **k: [0.0])  # keep the test fast
    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        materialize_model(tmp_path / "model", pretrain_steps=1)
    # Neither the model directory nor a temporary one (the lock file may stay).
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [foreign]


def test_materialize_replaces_a_dir_built_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "pretrain", lambda *a, **k: [0.0])  # the recipe, not the training, is tested
    path = materialize_model(tmp_path / "m", pretrain_steps=1, progress=False)
    assert json.loads((path / "builtin.json").read_text())["pretrain_steps"] == 1
    assert materialize_model(path, pretrain_steps=2, progress=False) == path
    assert json.loads((path / "builtin.json").read_text())["pretrain_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]
    assert (path / "model.safetensors").is_file() and path.stat().st_mode & 0o755 == 0o755


def test_builtin_names():
    assert BUILTIN_MODEL == "builtin:tiny-llama" and BUILTIN_DATA == "builtin:arithmetic"
