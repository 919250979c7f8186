import json
import os

import pytest

from cromwell.data.corpus.step_data import main

GSM8K_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")


def run(tmp_path, records, *flags):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    written, short = main(["--input", str(src), "--output", str(dst), *flags])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == written
    return out, short


def test_deepseek_steps_split_and_trivial_dropped(tmp_path):
    response = "First we compute the total cost.\n\nok\n\nThen we divide 12 by 4 to get 3.\n\nSo the final answer is 3."
    out, short = run(tmp_path, [{"question": "Q?", "deepseek_response": response}])
    assert short == 0
    rec = out[0]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"] == "Q?"
    assert rec["messages"][2]["content"].split("\n\n") == [
        "First we compute the total cost.", "Then we divide 12 by 4 to get 3.", "So the final answer is 3."]
    assert rec["total_steps"] == 3


def test_gsm8k_lines_become_steps_with_final_answer(tmp_path):
    answer = "He buys 3 * 4 = <<3*4=12>>12 apples in all.\nHe eats half: 12 / 2 = <<12/2=6>>6 apples.\n#### 6"
    out, _ = run(tmp_path, [{"question": "Q", "answer": answer}])
    content = out[0]["messages"][2]["content"]
    assert content == "He buys 3 * 4 = <<3*4=12>>12 apples in all.\n\nHe eats half: 12 / 2 = <<12/2=6>>6 apples.\n#### 6"
    assert out[0]["total_steps"] == 2 and out[0]["answer"] == "6"
    stripped, _ = run(tmp_path, [{"question": "Q", "answer": answer}], "--strip_calculator")
    assert "<<" not in stripped[0]["messages"][2]["content"]
    assert "12 apples in all." in stripped[0]["messages"][2]["content"]


def test_edge_cases_no_separator_one_step_empty_steps(tmp_path):
    records = [
        {"question": "no separator", "deepseek_response": "A single long reasoning paragraph without breaks."},
        {"question": "one step", "answer": "Only one step is needed here, 2+2=4.\n#### 4"},
        {"question": "empty steps", "deepseek_response": "\n\nStep one is long enough here.\n\n\n\n  \n\nStep two is long enough too.\n\n"},
    ]
    out, short = run(tmp_path, records)
    assert short == 2
    assert [r["question"] for r in out] == ["empty steps"]
    assert out[0]["messages"][2]["content"] == "Step one is long enough here.\n\nStep two is long enough too."
    kept, _ = run(tmp_path, records, "--keep_short")
    assert [r["total_steps"] for r in kept] == [1, 1, 2]


def test_custom_separator_and_threshold(tmp_path):
    out, _ = run(tmp_path, [{"question": "Q", "deepseek_response": "aa ### bbbbbb ### c"}],
                 "--separator", " ### ", "--min_step_chars", "2")
    assert out[0]["messages"][2]["content"] == "aa ### bbbbbb"


def test_bad_record_names_file_line_and_field(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"question": "Q", "answer": "x\n#### 1"}) + "\n" + json.dumps({"prompt": "Q"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: .*deepseek_response"):
        main(["--input", str(src), "--output", str(tmp_path / "o.jsonl")])
    src.write_text(json.dumps({"question": "Q", "answer": "no final answer"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: no '#### N'"):
        main(["--input", str(src), "--output", str(tmp_path / "o.jsonl")])


@pytest.mark.skipif(not os.path.isdir(GSM8K_DIR), reason="shared/data/gsm8k not present (developer/CI data only)")
def test_real_gsm8k_test_split(tmp_path):
    dst = tmp_path / "steps.jsonl"
    written, short = main(["--input", os.path.join(GSM8K_DIR, "test.jsonl"), "--output", str(dst)])
    assert written + short == 1319 and written > 1250
    rec = json.loads(dst.read_text().splitlines()[0])
    assert rec["total_steps"] >= 2 and rec["messages"][2]["content"].endswith(f"#### {rec['answer']}")
