"""Turn reasoning jsonl records into Step-JEPA chat records (docs/design.md, Step-JEPA fine-tuning).

Inputs, detected per record (or forced with --format):
  deepseek: {"question": ..., "deepseek_response": "step\\n\\nstep\\n\\n..."}
  gsm8k:    {"question": ..., "answer": "line\\nline\\n#### N"}  (one step per line)
Output, one per line:
  {"question", "messages": [system, user, assistant], "total_steps", "answer"}
where the assistant content is the kept steps joined by the separator. GSM8K's "#### N"
line is appended to the last step (after a newline) so the model learns to state the
final answer and step splitting on the separator still yields exactly total_steps steps.

  python tools/prepare_step_data.py --input train.jsonl --output steps.jsonl
"""
import argparse
import json
import re
import sys
from collections import Counter

DEFAULT_SYSTEM = "You are a helpful assistant. Solve the problem step by step."
CALCULATOR = re.compile(r"<<[^>]*>>")


def split_steps(text: str, separator: str, min_chars: int) -> tuple[list[str], int]:
    """Steps of `text` split on `separator`, stripped; empty ones vanish and those shorter
    than `min_chars` are dropped. Returns (steps, number of trivial steps dropped)."""
    parts = [p.strip() for p in text.split(separator)]
    parts = [p for p in parts if p]
    kept = [p for p in parts if len(p) >= min_chars]
    return kept, len(parts) - len(kept)


def gsm8k_steps(answer: str, strip_calculator: bool, min_chars: int) -> tuple[list[str], str, int]:
    """(steps, final answer, trivial dropped) from a GSM8K answer; the final answer is the
    text after the last '####'."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '#### N' final answer")
    if strip_calculator:
        body = CALCULATOR.sub("", body)
    steps, trivial = split_steps(body, "\n", min_chars)
    return steps, final.strip(), trivial


def detect_format(record: dict) -> str:
    if "deepseek_response" in record:
        return "deepseek"
    if "answer" in record:
        return "gsm8k"
    raise ValueError(f"neither 'deepseek_response' nor 'answer' field (fields: {sorted(record)})")


def convert(record: dict, fmt: str, separator: str = "\n\n", min_chars: int = 20,
            strip_calculator: bool = False, system: str = DEFAULT_SYSTEM) -> tuple[dict, int]:
    """One output record and the number of trivial steps dropped from it."""
    if "question" not in record:
        raise ValueError(f"missing field 'question' (fields: {sorted(record)})")
    if fmt == "deepseek":
        steps, trivial = split_steps(record["deepseek_response"], separator, min_chars)
        final = record.get("answer")
        content = separator.join(steps)
    else:
        steps, final, trivial = gsm8k_steps(record["answer"], strip_calculator, min_chars)
        content = separator.join(steps) + f"\n#### {final}" if steps else f"#### {final}"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": record["question"]},
        {"role": "assistant", "content": content},
    ]
    return {"question": record["question"], "messages": messages, "total_steps": len(steps), "answer": final}, trivial


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--format", choices=["auto", "deepseek", "gsm8k"], default="auto")
    ap.add_argument("--separator", default="\n\n", help="step separator (input deepseek responses and output)")
    ap.add_argument("--min_step_chars", type=int, default=20, help="steps shorter than this are dropped")
    ap.add_argument("--strip_calculator", action="store_true", help="remove GSM8K <<a*b=c>> annotations")
    ap.add_argument("--keep_short", action="store_true", help="also write records with fewer than 2 steps")
    ap.add_argument("--system", default=DEFAULT_SYSTEM)
    args = ap.parse_args(argv)
    args.separator = args.separator.encode().decode("unicode_escape")  # let '\n\n' be typed on a shell

    counts, formats, step_hist = Counter(), Counter(), Counter()
    short_lines = []
    with open(args.input) as src, open(args.output, "w") as dst:
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                fmt = detect_format(record) if args.format == "auto" else args.format
                out, trivial = convert(record, fmt, args.separator, args.min_step_chars,
                                       args.strip_calculator, args.system)
            except (ValueError, KeyError) as e:
                sys.exit(f"{args.input}:{lineno}: {e}")
            counts["read"] += 1
            counts["trivial_steps_dropped"] += trivial
            formats[fmt] += 1
            step_hist[out["total_steps"]] += 1
            if out["total_steps"] < 2:
                short_lines.append(lineno)
                if not args.keep_short:
                    continue
            dst.write(json.dumps(out) + "\n")
            counts["written"] += 1
    for lineno in short_lines[:20]:
        print(f"fewer than 2 steps: {args.input}:{lineno}")
    if len(short_lines) > 20:
        print(f"... and {len(short_lines) - 20} more with fewer than 2 steps")
    total = sum(k * v for k, v in step_hist.items())
    print(f"read {counts['read']} ({dict(formats)}), written {counts['written']}, "
          f"fewer than 2 steps {len(short_lines)} ({'kept' if args.keep_short else 'dropped'}), "
          f"trivial steps dropped {counts['trivial_steps_dropped']}, "
          f"mean steps {total / max(counts['read'], 1):.2f}, histogram {dict(sorted(step_hist.items()))}")
    return counts["written"], len(short_lines)

