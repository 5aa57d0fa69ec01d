"""The evaluation runner (exact accuracy from a fake model, resume without regenerating, atomic outputs),
`python -m sorsa.eval.score` as a subprocess, and the generation backends on a tiny random Llama."""
import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sorsa.eval import generate as gen
from sorsa.eval.runner import MAX_NEW_TOKENS, STOP_STRINGS, evaluate, read_generations
from sorsa.tasks.data import ANSWER_CUE, humaneval_test_prompt, math_test_prompt

REPO = Path(__file__).resolve().parents[1]


def _gsm_file(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(n)))
    return path


class FakeModel:
    """Answers example i (recognised by its question) right when i is even; counts what it was asked."""

    def __init__(self, fail_after_calls: int | None = None):
        self.prompts: list[str] = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls
        self.batch_size = 3

    def __call__(self, prompts: list[str]) -> list[str]:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.prompts += prompts
        out = []
        for p in prompts:
            i = int(p.split("What is ")[1].split(" ")[0])
            out.append(f"{i} plus {i}. {ANSWER_CUE}{2 * i if i % 2 == 0 else 2 * i + 1}")
        return out


def test_accuracy_outputs_and_limit(tmp_path):
    test_file = _gsm_file(tmp_path)
    model = FakeModel()
    results = evaluate("gsm-8k", tmp_path / "out", model, test_file=test_file, settings={"model": "fake"},
                       progress=False)
    assert (results["accuracy"], results["correct"], results["total"]) == (0.5, 5, 10)
    assert (results["strict_correct"], results["flexible_correct"], results["num_examples"]) == (5, 5, 10)
    assert results["settings"] == {"model": "fake"} and "python" in results["versions"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["correct"] == 5
    lines = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").open()]
    assert [r["id"] for r in lines] == list(range(10))
    assert lines[0]["prompt"] == math_test_prompt("What is 0 + 0?") and model.calls == 4  # chunks of batch_size
    assert {k for k in lines[1]} >= {"id", "prompt", "completion", "extracted", "gold", "correct", "strict",
                                     "flexible", "strict_correct", "flexible_correct"}
    assert (lines[1]["extracted"], lines[1]["gold"], lines[1]["correct"]) == ("3", "2", False)
    limited = evaluate("gsm-8k", tmp_path / "lim", FakeModel(), test_file=test_file, limit=4, progress=False)
    assert (limited["correct"], limited["total"], limited["limit"]) == (2, 4, 4)
    with pytest.raises(ValueError, match="limit"):
        evaluate("gsm-8k", tmp_path / "bad", FakeModel(), test_file=test_file, limit=0, progress=False)
    with pytest.raises(ValueError, match="unknown test dataset"):
        evaluate("gsm8k-typo", tmp_path / "bad", FakeModel(), test_file=test_file, progress=False)


def test_resume_after_a_crash_reuses_finished_generations(tmp_path):
    test_file, out = _gsm_file(tmp_path), tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate("gsm-8k", out, FakeModel(fail_after_calls=2), test_file=test_file, progress=False)
    assert len(read_generations(out / "generations.jsonl")) == 6 and not (out / "results.json").exists()
    with (out / "generations.jsonl").open("a") as f:  # a line cut off mid-write by the crash
        f.write('{"id": 6, "prompt": "Below is')
    again = FakeModel()
    results = evaluate("gsm-8k", out, again, test_file=test_file, progress=False)
    asked = sorted(int(p.split("What is ")[1].split(" ")[0]) for p in again.prompts)
    assert asked == [6, 7, 8, 9]  # 0-5 reused; 6 (the cut-off line) and the rest generated
    assert (results["correct"], results["total"], results["reused_generations"], results["new_generations"]) == \
        (5, 10, 6, 4)
    assert [r["id"] for r in read_generations(out / "generations.jsonl")] == list(range(10))
    third = FakeModel()
    assert evaluate("gsm-8k", out, third, test_file=test_file, progress=False)["correct"] == 5 and third.calls == 0
    # Different generation settings must not silently mix with the old generations.
    with pytest.raises(ValueError, match="other settings"):
        evaluate("gsm-8k", out, FakeModel(), test_file=test_file, settings={"max_new_tokens": 5}, progress=False)
    fresh = FakeModel()
    evaluate("gsm-8k", out, fresh, test_file=test_file, settings={"max_new_tokens": 5}, resume=False, progress=False)
    assert len(fresh.prompts) == 10



def test_a_replacing_run_that_crashes_leaves_no_stale_results(tmp_path):
    """resume=False replaces the generations; until it finishes there is no results.json describing the old
    ones (a report would show their accuracy), while a refused call still leaves it as it was."""
    test_file, out = _gsm_file(tmp_path), tmp_path / "out"
    evaluate("gsm-8k", out, FakeModel(), test_file=test_file, progress=False)
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        evaluate("gsm-8k", out, FakeModel(), test_file=test_file, settings={"max_new_tokens": 5}, progress=False)
    assert (out / "results.json").read_bytes() == before
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate("gsm-8k", out, FakeModel(fail_after_calls=1), test_file=test_file, resume=False, progress=False)
    assert not (out / "results.json").exists() and len(read_generations(out / "generations.jsonl")) == 3

def test_bad_generate_fn_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="one completion string per prompt"):
        evaluate("gsm-8k", tmp_path / "o", lambda prompts: ["x"], test_file=_gsm_file(tmp_path), progress=False)


def test_math_and_humaneval_through_the_runner(tmp_path):
    rows = [{"problem": "1/2 as a decimal?", "solution": "$\\boxed{0.5}$"}, {"problem": "2+2?", "solution": "\\boxed{4}"}]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {math_test_prompt(r["problem"]): a for r, a in zip(rows, ["The answer is: \\frac12", "\\boxed{5}"])}
    res = evaluate("math", tmp_path / "m", lambda ps: [answers[p] for p in ps], test_file=tmp_path / "math.jsonl",
                   progress=False)
    assert (res["correct"], res["total"]) == (1, 2)

    from sorsa.eval.humaneval import load_examples
    problems = {humaneval_test_prompt(ex.question): ex for ex in load_examples()[:3]}
    # A model that returns the whole function in the '''python block the prompt asks for.
    reply = {p: f"Here you go:\n'''python\n{ex.question}{ex.gold}'''\n" for p, ex in problems.items()}
    res = evaluate("humaneval", tmp_path / "h", lambda ps: [reply[p] for p in ps], limit=3, workers=2, progress=False)
    assert (res["correct"], res["total"], res["num_examples"], res["statuses"]) == (3, 3, 164, {"passed": 3})
    assert MAX_NEW_TOKENS == {"gsm-8k": 1024, "math": 2048, "humaneval": 2048}


def test_score_cli(tmp_path):
    test_file = _gsm_file(tmp_path, n=4)
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps(x) + "\n" for x in [
        {"id": 0, "completion": "The answer is: 0"}, {"id": 1, "completion": "so 2 in total"},
        {"id": 3, "completion": "The answer is: 7"}]))
    cmd = [sys.executable, "-m", "sorsa.eval.score", "--test-dataset", "gsm-8k", "--generations", str(gens),
           "--test-file", str(test_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["correct"], summary["total"], summary["strict_correct"]) == (2, 3, 1)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    verdicts = [json.loads(line) for line in (tmp_path / "gens.scored.jsonl").open()]
    assert [(v["id"], v["correct"]) for v in verdicts] == [(0, True), (1, True), (3, False)]

    gens.write_text('{"id": 99, "completion": "x"}\n')
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: line 1: id 99 is not in the gsm-8k test data "
                                               f"({test_file}); expected a row index 0..3"]


# --------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama over a character vocabulary (printable, so stop strings are easy to place)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,:#\n"
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # no pad token, like Llama 2
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


PROMPTS = ["abc", "hello world, a longer prompt", "Q: 12", "zz top"]


def test_batched_left_padding_equals_one_by_one(tiny):
    model, tokenizer = tiny
    batched = gen.HFGenerator(model, tokenizer, max_new_tokens=12, batch_size=4, stop=())(PROMPTS)
    single = [gen.HFGenerator(model, tokenizer, max_new_tokens=12, batch_size=1, stop=())([p])[0] for p in PROMPTS]
    assert batched == single and tokenizer.pad_token is None  # padded with EOS, tokenizer untouched
    assert sum(len(c) for c in batched) > 0 and all(len(c) <= 12 for c in batched)


def test_stop_string_ends_generation_early_and_is_cut(tiny):
    model, tokenizer = tiny
    free = gen.HFGenerator(model, tokenizer, max_new_tokens=20, stop=())(["hello world, a longer prompt"])[0]
    assert len(free) >= 10
    stop = free[6:9]
    steps = []
    hook = model.lm_head.register_forward_hook(lambda *a: steps.append(1))
    try:
        cut = gen.HFGenerator(model, tokenizer, max_new_tokens=20, stop=(stop,))(["hello world, a longer prompt"])[0]
    finally:
        hook.remove()
    assert cut == free[:free.index(stop)] and len(steps) < 20  # stopped, and did not run to the limit


def test_eos_ends_a_completion(tiny):
    model, tokenizer = tiny
    text = gen.HFGenerator(model, tokenizer, max_new_tokens=10, stop=())(["zz top"])[0]
    assert len(text) == 10
    eos_char = text[4]  # pretend the 5th generated character is the end-of-sequence token
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(eos_char)
    try:
        ended = gen.HFGenerator(model, tokenizer, max_new_tokens=10, stop=())(["zz top"])[0]
    finally:
        model.generation_config.eos_token_id = 1
    assert ended == text[:text.index(eos_char)]


def test_truncate_at_stop():
    assert gen.truncate_at_stop("answer\n\n### Instruction:\nmore", STOP_STRINGS["math"]) == "answer\n\n"
    assert gen.truncate_at_stop("code\n@@ Instruction\n", STOP_STRINGS["humaneval"]) == "code\n"
    assert gen.truncate_at_stop("no stop", ("###",)) == "no stop"


def test_backend_selection_and_hook(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(gen, "vllm_available", lambda: False)
    made = gen.make_generator(model, tokenizer, backend="auto", max_new_tokens=3, batch_size=2)
    assert isinstance(made, gen.HFGenerator) and made.batch_size == 2 and made.max_new_tokens == 3
    with pytest.raises(ValueError, match="vllm"):
        gen.make_generator("some/model", backend="vllm")
    with pytest.raises(ValueError, match="unknown generation backend 'tpu'"):
        gen.make_generator("some/model", backend="tpu")
    monkeypatch.setitem(gen.BACKENDS, "rwkv", lambda model, tokenizer=None, **kw: (lambda prompts: ["r"] * len(prompts)))
    assert gen.make_generator("x.pth", backend="rwkv")(["a", "b"]) == ["r", "r"]
