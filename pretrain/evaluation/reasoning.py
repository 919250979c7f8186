"""GSM8K and NL-RX-SYNTH as chat tasks: reading the test files, and scoring an answer (the number after
'####' against GSM8K's gold; NL-RX's regex by exact match). tools/evaluate.py and tools/eval_reasoning.py
score with these."""

import json
import re
import sys

from cromwell.data.corpus.step_data import convert

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The final answer in a solution: after the last '####' if present, else the last number."""
    tail = text.rpartition("####")[2] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_correct(prediction: str, gold_answer: str) -> bool:
    gold = extract_number("####" + gold_answer.rpartition("####")[2])
    pred = extract_number(prediction)
    return pred is not None and gold is not None and abs(pred - gold) < 1e-6


def regex_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def read_tasks(task: str, path: str, limit: int) -> list[dict]:
    """[{'messages': [system, user, assistant (gold)], 'gold': ...}] from a GSM8K or NL-RX file."""
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            rec = json.loads(line)
            try:
                if task == "gsm8k":
                    chat, _ = convert(rec, "gsm8k")
                    items.append({"messages": chat["messages"], "gold": rec["answer"]})
                else:
                    items.append({"messages": rec["messages"], "gold": rec["messages"][-1]["content"]})
            except (KeyError, ValueError, IndexError) as e:
                sys.exit(f"{path}:{lineno}: not a {task} record ({e!r})")
            if len(items) == limit:
                break
    return items
