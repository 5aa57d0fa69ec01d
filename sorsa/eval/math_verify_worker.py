"""The process that runs math-verify's symbolic comparisons for `eval.hendrycks_math`, one JSON line each.

It lives in its own process so that the parent can kill it when a comparison hangs (sympy can spend
minutes simplifying, and no in-process timeout interrupts long C-level integer work). Stdlib + math_verify.
Protocol: the worker prints {"ready": true}; then for each input line {"gold": str, "pred": str} it prints
{"equal": bool, "error": str | null}. Any exception is reported as not equal.
"""
import json
import sys


def compare(gold: str, pred: str, timeout_s: int) -> bool:
    """math_verify's equivalence of two LaTeX answers (each wrapped in $...$), gold first."""
    from math_verify import parse, verify

    # raise_on_error: an exception must reach us (and become "not equal"), never be guessed around.
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s, raise_on_error=True)
    pred_parsed = parse(f"${pred}$", parsing_timeout=timeout_s, raise_on_error=True)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s, raise_on_error=True))


def main() -> None:
    timeout_s = max(1, int(sys.argv[1])) if len(sys.argv) > 1 else 5
    import math_verify  # noqa: F401  (import before "ready", so the first comparison is not charged for it)

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"equal": compare(str(request["gold"]), str(request["pred"]), timeout_s), "error": None}
        except BaseException as e:  # noqa: BLE001  (a timeout or parser error is an answer: not equal)
            if isinstance(e, KeyboardInterrupt):
                raise
            reply = {"equal": False, "error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
