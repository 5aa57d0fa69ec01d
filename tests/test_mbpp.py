"""MBPP: hand-written problems in the hub's schema (google-research-datasets/mbpp, "full"): the extractor's golden
table, the prompt, gold solutions pass (100 %) and empty bodies fail (0 %) in the sandbox, the test task_ids
only, eval.score and run.py --test-dataset mbpp. No MBPP copy exists offline (../shared/data has none): the
real-data check skips unless one is placed there."""
import json
from pathlib import Path

import pytest

from sorsa import cli as run
from sorsa.eval import mbpp, score
from sorsa.eval.benchmarks import STOP_STRINGS, default_max_new_tokens, get_benchmark

# In the hub's schema and style (\r\n line ends and tabs in `code`, as the dataset has them).
PROBLEMS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character "
     "from the string.", "code": "def remove_Occ(s,ch): \r\n\tfor i in range(len(s)): \r\n\t\tif (s[i] == ch): "
     "\r\n\t\t\ts = s[0 : i] + s[i + 1:] \r\n\t\t\tbreak\r\n\tfor i in range(len(s) - 1,-1,-1):  \r\n\t\tif "
     "(s[i] == ch): \r\n\t\t\ts = s[0 : i] + s[i + 1:] \r\n\t\t\tbreak\r\n\treturn s ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to find the hypotenuse of a right angled triangle.",
     "code": "def hyp(a, b):\r\n  return sqrt(a * a + b * b)",
     "test_list": ["assert hyp(3, 4) == 5.0", "assert hyp(5, 12) == 13.0", "assert hyp(8, 15) == 17.0"],
     "test_setup_code": "from math import sqrt", "challenge_test_list": []},
    {"task_id": 510, "text": "Write a function to sort a list of tuples by their second item.",
     "code": "def sort_second(items):\n    return sorted(items, key=lambda t: t[1])",
     "test_list": ["assert sort_second([(1, 3), (2, 1)]) == [(2, 1), (1, 3)]",
                   "assert sort_second([]) == []", "assert sort_second([(0, 0)]) == [(0, 0)]"],
     "test_setup_code": "", "challenge_test_list": []},
]
# Rows of the whole dataset outside the test split (prompting, validation, training task_ids).
OTHERS = [{**PROBLEMS[2], "task_id": tid} for tid in (2, 511, 600)]

EXTRACT = [  # completion -> extracted code
    ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x\n"),
    ("Here:\n'''python\ndef f(x):\n    return x\n'''\nassert f(1) == 1", "def f(x):\n    return x\n"),
    ("def f(x):\n    assert x > 0\n    return x\n\nassert f(1) == 1\nassert f(2) == 2\n",
     "def f(x):\n    assert x > 0\n    return x\n\n"),  # only top-level asserts go
    ("def f(x):\n    return x\n\nif __name__ == \"__main__\":\n    print(f(1))\n", "def f(x):\n    return x\n\n"),
    ("def f(x):\n    return x\nassert f(\n    1) == 1\nprint('ok')", "def f(x):\n    return x\nprint('ok')"),
    ("", ""),
]


@pytest.mark.parametrize("completion,code", EXTRACT)
def test_extract_code(completion, code):
    assert mbpp.extract_code(completion) == code


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in OTHERS[:1] + PROBLEMS + OTHERS[1:]))
    return path


def test_only_the_test_task_ids_load_in_order(problems_file, tmp_path):
    examples = mbpp.load_examples(problems_file)
    assert [ex.id for ex in examples] == [11, 12, 510]
    assert examples[1].meta == {"tests": PROBLEMS[1]["test_list"], "setup": "from math import sqrt"}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in OTHERS))
    with pytest.raises(ValueError, match="no MBPP test problem"):
        mbpp.load_examples(tmp_path / "train.jsonl")
    assert get_benchmark("mbpp") is mbpp and default_max_new_tokens("mbpp") == 2048 and "@@ Instruction" in STOP_STRINGS["mbpp"]


def test_prompt_is_the_instruction_template_with_text_and_tests(problems_file):
    ex = mbpp.load_examples(problems_file)[1]
    text = mbpp.prompt(ex)
    assert text.startswith("@@ Instruction\nHere is the given problem and test examples:\n"
                           "Write a function to find the hypotenuse of a right angled triangle.\n"
                           "assert hyp(3, 4) == 5.0\nassert hyp(5, 12) == 13.0\nassert hyp(8, 15) == 17.0\n\n")
    assert "Please use the python programming language to solve this problem." in text
    assert text.endswith("'''python\n# Your codes here\n'''\n\n@@ Response\n")


def test_gold_scores_100_and_empty_scores_0(problems_file):
    examples = mbpp.load_examples(problems_file)
    fenced = [f"Sure.\n```python\n{ex.gold}\n```\nThis passes the tests." for ex in examples]
    gold = mbpp.summarize(mbpp.score(examples, fenced, workers=2))
    assert (gold["accuracy"], gold["correct"], gold["total"]) == (1.0, 3, 3)
    raw = mbpp.summarize(mbpp.score(examples, [ex.gold for ex in examples], workers=2))
    assert raw["accuracy"] == 1.0
    empty = mbpp.score(examples, ["", "```python\n```", "def sort_second(items):\n    pass\n"], workers=2)
    assert mbpp.summarize(empty)["accuracy"] == 0.0 and not any(v["correct"] for v in empty)
    assert "NameError" in empty[0]["error"] and "AssertionError" in empty[2]["error"]
    # a wrong answer fails, and the model's own (wrong) asserts never decide the verdict
    wrong = mbpp.score(examples[2:], ["def sort_second(items):\n    return items\n\nassert sort_second([]) == []"])
    assert not wrong[0]["correct"]


def test_eval_score_cli_scores_a_file_by_task_id(problems_file, tmp_path, capsys):
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"id": 510, "completion": PROBLEMS[2]["code"]}) + "\n"
                    + json.dumps({"id": "11", "completion": "pass"}) + "\n")
    assert score.main(["--test-dataset", "mbpp", "--generations", str(gens), "--test-file", str(problems_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["accuracy"], summary["correct"], summary["total"]) == (0.5, 1, 2)
    verdicts = [json.loads(line) for line in score.scored_path(gens).read_text().splitlines()]
    assert [(v["id"], v["correct"]) for v in verdicts] == [(510, True), (11, False)]
    gens.write_text(json.dumps({"id": 0, "completion": "x"}) + "\n")  # a position, not a task_id
    assert score.main(["--test-dataset", "mbpp", "--generations", str(gens), "--test-file", str(problems_file)]) == 2
    assert "an MBPP task_id 11..510" in capsys.readouterr().err


def test_run_test_dataset_mbpp(problems_file, tmp_path, builtin_model_dir):
    """run.py --test --test-dataset mbpp generates with the MBPP prompt and scores in the sandbox."""
    argv = ["--test", "--model", str(builtin_model_dir), "--test-dataset", "mbpp", "--test-file", str(problems_file),
            "--run-path", str(tmp_path / "runs"), "--max-new-tokens", "4", "--test-precision", "fp32", "--backend", "hf"]
    assert run.main(argv) == 0
    (eval_dir,) = (tmp_path / "runs").glob("eval-*/eval/mbpp")
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["total"] == 3 and results["dataset"] == "mbpp" and results["accuracy"] == 0.0
    records = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    examples = mbpp.load_examples(problems_file)
    assert [r["id"] for r in records] == [11, 12, 510]
    assert [r["prompt"] for r in records] == [mbpp.prompt(ex) for ex in examples]


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_real_mbpp_gold_passes_where_a_copy_exists():
    copies = sorted(SHARED.glob("mbpp*.jsonl")) if SHARED.is_dir() else []
    if not copies:
        pytest.skip("no MBPP copy in ../shared/data (none exists offline)")
    examples = mbpp.load_examples(copies[0])
    verdicts = mbpp.score(examples, [ex.gold for ex in examples], workers=4)
    assert len(examples) == 500 and mbpp.summarize(verdicts)["accuracy"] == 1.0
