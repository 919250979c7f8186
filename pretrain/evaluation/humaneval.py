"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): functional correctness
of code completions, scored as pass@k.

    problems = load_problems()                                   # 164 {task_id, prompt, test, entry_point, ...}
    completions = {p["task_id"]: [truncate(text), ...] for p, text in ...}
    scores = evaluate(problems, completions, ks=(1, 10))         # {"pass@1", "pass@10", "n", "problems", "results"}

Each completion runs as its own program (prompt + completion + the problem's tests + `check(entry_point)`) in
pretrain/evaluation/sandbox.py. It passes when the program exits 0 AND prints, as its very last statement, NONCE (random per
process): a completion that exits early with status 0 (os._exit(0), sys.exit(0)) skips the tests and the nonce,
and cannot guess it. Generation should stop at STOP_SEQUENCES (the paper's): what follows the function body is
not part of the completion; truncate() cuts a completion there.

pass@k is the paper's unbiased estimator 1 - C(n-c, k) / C(n, k) for n samples of which c pass, averaged
over the problems; n samples per problem (the same n for all), k <= n.
"""

from __future__ import annotations

import gzip
import json
import math
import secrets
from pathlib import Path
from statistics import fmean

from cromwell.pretrain.evaluation import sandbox

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO.parent / "shared/data/humaneval/HumanEval.jsonl.gz"
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
NONCE = secrets.token_hex(16)


def load_problems(path=DEFAULT_PATH) -> list[dict]:
    """The problems of a HumanEval.jsonl.gz, in file order."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (HumanEval.jsonl.gz, see ../shared/data/humaneval)") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a gzipped JSON-lines HumanEval file: {e}") from e
    for i, problem in enumerate(problems, 1):
        missing = [field for field in FIELDS if not isinstance(problem, dict) or field not in problem]
        if missing:
            raise ValueError(f"{path}: problem {i} has no {', '.join(missing)}")
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def program(problem: dict, completion: str) -> str:
    """The program that tests `completion`: it prints NONCE last, only when every check passed."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
            f"print({NONCE!r})\n")


def truncate(completion: str) -> str:
    """`completion` up to the first stop sequence."""
    cuts = [i for stop in STOP_SEQUENCES if (i := completion.find(stop)) != -1]
    return completion[:min(cuts, default=len(completion))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n, c of which are correct, is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product of small factors (the paper's form): no huge binomials.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(problems: list[dict], completions: dict[str, list[str]], ks=(1,), timeout_s: float = 10.0,
             workers: int = 2) -> dict:
    """{"pass@k" for each k, "n": samples per problem, "problems": how many, "results": {task_id: {"passed":
    how many of the n, "failure": why the first failing one failed, or None}}}."""
    if not problems:
        raise ValueError("no problems to evaluate")
    ids = [p["task_id"] for p in problems]
    missing = [task for task in ids if not completions.get(task)]
    unknown = sorted(set(completions) - set(ids))
    if missing or unknown:
        raise ValueError(f"completions must cover exactly the problems: none for {missing[:5]} ({len(missing)} in "
                         f"all), completions for unknown problems {unknown[:5]} ({len(unknown)} in all)")
    counts = {task: len(completions[task]) for task in ids}
    n = counts[ids[0]]
    if any(count != n for count in counts.values()):
        raise ValueError(f"every problem needs the same number of completions, got {sorted(set(counts.values()))}")
    if not all(1 <= k <= n for k in ks):
        raise ValueError(f"pass@k needs 1 <= k <= n = {n} completions per problem, got ks={tuple(ks)}")
    jobs = [(problem, completion) for problem in problems for completion in completions[problem["task_id"]]]
    runs = sandbox.run_many([program(p, c) for p, c in jobs], workers=workers, progress="HumanEval",
                            timeout_s=timeout_s)
    results = {task: {"passed": 0, "failure": None} for task in ids}
    for (problem, _), run in zip(jobs, runs):
        result = results[problem["task_id"]]
        failure = _failure(run)
        if failure is None:
            result["passed"] += 1
        elif result["failure"] is None:
            result["failure"] = failure
    scores = {f"pass@{k}": fmean(pass_at_k(n, r["passed"], k) for r in results.values()) for k in ks}
    return {**scores, "n": n, "problems": len(problems), "results": results}


def _failure(run: sandbox.SandboxResult) -> str | None:
    if run.ok:
        return None if NONCE in run.stdout else "exited before the tests finished (status 0, no completion marker)"
    last = run.stderr.strip().splitlines()[-1:]
    return f"{run.reason}: {last[0]}" if last and not run.timed_out else run.reason
