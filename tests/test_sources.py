"""Source adapters on small files in each source's published format: the documents they make, and bad
records raised (naming file and place) or skipped (counted, one summary line per file)."""

import io
import json
import logging
import re
import tarfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
import webdataset
from PIL import Image

from cromwell.data.sources import ADAPTERS, Skipped, SourceError

DESIGN_SOURCES = ["stack_v2", "codecontests", "github_prs", "arxiv", "openstax", "stackoverflow", "vision_text",
                "financial_code"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def image_bytes(image_format: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(out, format=image_format)
    return out.getvalue()


def read_all(source: str, path: Path, **kwargs) -> list:
    return list(ADAPTERS[source](path, **kwargs))


def test_every_design_source_has_an_adapter():
    assert sorted(ADAPTERS) == sorted(DESIGN_SOURCES)


STACK_V2 = {"blob_id": "b1", "directory_id": "d1", "path": "src/app.py", "content_id": "c1",
            "detected_licenses": ["MIT"], "license_type": "permissive", "repo_name": "octo/app",
            "src_encoding": "UTF-8", "language": "Python", "is_vendor": False, "is_generated": False,
            "length_bytes": 19, "extension": "py", "content": "print('hello')\n"}
CODECONTESTS = {"name": "76_B. Mice", "description": "Mice search for cheese.",
                "public_tests": {"input": ["3 2\n"], "output": ["1\n"]}, "source": 2, "difficulty": 8,
                "solutions": {"language": [2, 3, 2], "solution": ["int main(){}", "print(1)", "int main(){return 0;}"]},
                "incorrect_solutions": {"language": [], "solution": []}, "cf_rating": 2100,
                "cf_tags": ["greedy", "two pointers"]}
ARXIV = {"text": "\\section{Intro} We study attention.",
         "meta": {"timestamp": "2023-01-01T00:00:00", "yymm": "2301", "arxiv_id": "2301.00001",
                  "language": "en", "url": "https://arxiv.org/abs/2301.00001", "source": "arxiv"}}
FINANCIAL = {"code": "def sharpe(r): ...", "language": "python", "path": "risk/metrics.py", "repo": "q/lib",
             "domain": "risk"}


def pr_event(action: str = "closed", **extra) -> dict:
    return {"id": "1", "type": "PullRequestEvent", "repo": {"id": 7, "name": "octo/app"},
            "created_at": "2024-05-01T10:00:00Z",
            "payload": {"action": action, "number": 42, "pull_request": {
                "number": 42, "title": "Fix overflow", "body": "Use 64-bit sums.", "state": "closed",
                "merged": True, "html_url": "https://github.com/octo/app/pull/42",
                "diff_url": "https://github.com/octo/app/pull/42.diff"}},
            **extra}


DIFF = "diff --git a/x.c b/x.c\n-int s;\n+long s;\n"


def test_stack_v2_document(tmp_path):
    [doc] = read_all("stack_v2", write_jsonl(tmp_path / "s.jsonl", [STACK_V2]))
    assert doc.text == "print('hello')\n" and doc.source == "stack_v2" and doc.image is None
    assert doc.metadata == {"blob_id": "b1", "repo_name": "octo/app", "path": "src/app.py", "language": "Python",
                            "src_encoding": "UTF-8", "license_type": "permissive", "detected_licenses": ["MIT"]}


def test_codecontests_document_has_statement_and_one_solution_per_language(tmp_path):
    [doc] = read_all("codecontests", write_jsonl(tmp_path / "c.jsonl", [CODECONTESTS]))
    assert doc.text == ("76_B. Mice\n\nMice search for cheese.\n\nSolution (CPP):\nint main(){}"
                        "\n\nSolution (PYTHON3):\nprint(1)")
    assert doc.metadata == {"name": "76_B. Mice", "problem_source": "CODEFORCES", "difficulty": 8,
                            "cf_rating": 2100, "cf_tags": ["greedy", "two pointers"],
                            "solution_languages": ["CPP", "PYTHON3"]}


def test_github_prs_keep_closed_pull_requests_only(tmp_path):
    events = [{"id": "0", "type": "PushEvent", "payload": {}}, pr_event("opened", diff=DIFF), pr_event(diff=DIFF)]
    [doc] = read_all("github_prs", write_jsonl(tmp_path / "2024-05-01-10.json", events))
    assert doc.text == f"Fix overflow\n\nUse 64-bit sums.\n\n{DIFF}"
    assert doc.metadata == {"repo": "octo/app", "number": 42, "state": "closed", "merged": True,
                            "url": "https://github.com/octo/app/pull/42", "created_at": "2024-05-01T10:00:00Z"}


def test_arxiv_document(tmp_path):
    [doc] = read_all("arxiv", write_jsonl(tmp_path / "arxiv_0.jsonl", [ARXIV]))
    assert doc.text == ARXIV["text"]
    assert doc.metadata == {"arxiv_id": "2301.00001", "url": "https://arxiv.org/abs/2301.00001", "yymm": "2301",
                            "timestamp": "2023-01-01T00:00:00", "language": "en"}


def test_financial_code_document(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [FINANCIAL, {"code": "x", "language": "r"}])
    doc, bare = read_all("financial_code", path)
    assert doc.text == "def sharpe(r): ..."
    assert doc.metadata == {"language": "python", "path": "risk/metrics.py", "repo": "q/lib", "domain": "risk"}
    assert bare.metadata == {"language": "r", "path": None, "repo": None, "domain": None}


# One bad line between two good ones, per JSON-lines source, with what its error must say.
BAD_JSON_LINES = [
    ("stack_v2", STACK_V2, '{"blob_id": "b2", "content": ', "not valid JSON"),
    ("stack_v2", STACK_V2, {**STACK_V2, "content": 7}, "field 'content' must be str, got int 7"),
    ("stack_v2", STACK_V2, '["a list"]', "must be a JSON object"),
    ("codecontests", CODECONTESTS, {**CODECONTESTS, "solutions": {"language": [2], "solution": []}},
     "1 languages for 0 solutions"),
    ("codecontests", CODECONTESTS, {**CODECONTESTS, "solutions": {"language": [9], "solution": ["x"]}},
     "unknown id 9"),
    ("codecontests", CODECONTESTS, {**CODECONTESTS, "solutions": {"language": ["2"], "solution": ["x"]}},
     "field 'solutions.language' must be list[int]"),
    ("github_prs", pr_event(diff=DIFF), pr_event(), "missing field 'diff'"),
    ("github_prs", pr_event(diff=DIFF), {**pr_event(diff=DIFF), "payload": {"action": "closed", "number": True}},
     "missing field 'payload.pull_request.title'"),
    ("arxiv", ARXIV, {"text": "t", "meta": {"yymm": "2301"}}, "missing field 'meta.arxiv_id'"),
    ("arxiv", ARXIV, {"text": None, "meta": ARXIV["meta"]}, "field 'text' must be str, got NoneType"),
    ("financial_code", FINANCIAL, {"language": "python"}, "missing field 'code'"),
    ("financial_code", FINANCIAL, {**FINANCIAL, "domain": 3}, "field 'domain' must be str"),
]


@pytest.mark.parametrize("source, good, bad, message", BAD_JSON_LINES)
def test_bad_json_line_raises_naming_file_and_line(tmp_path, source, good, bad, message):
    path = write_jsonl(tmp_path / "part.jsonl", [good, bad, good])
    with pytest.raises(SourceError, match=rf"part\.jsonl line 2: .*{re.escape(message)}"):
        read_all(source, path)


@pytest.mark.parametrize("source, good, bad, message", BAD_JSON_LINES)
def test_bad_json_line_is_skipped_counted_and_reported(tmp_path, caplog, source, good, bad, message):
    path = write_jsonl(tmp_path / "part.jsonl", [good, bad, good, bad])
    skipped = Skipped()
    with caplog.at_level(logging.WARNING):
        documents = read_all(source, path, on_error="skip", skipped=skipped)
    assert len(documents) == 2 and skipped.counts[path] == 2
    [summary] = [r.getMessage() for r in caplog.records]
    assert summary.startswith(f"{path}: skipped 2 bad record(s); the first: line 2: ") and message in summary


def test_bad_utf8_line_is_one_bad_record(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_bytes(json.dumps(ARXIV).encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(SourceError, match="line 2: not UTF-8"):
        read_all("arxiv", path)
    assert len(read_all("arxiv", path, on_error="skip")) == 1


def test_skipped_totals_over_files_and_on_error_is_checked(tmp_path):
    skipped = Skipped()
    for name in ("a.jsonl", "b.jsonl"):
        read_all("financial_code", write_jsonl(tmp_path / name, [FINANCIAL, "{"]), on_error="skip", skipped=skipped)
    assert skipped.total == 2 and len(skipped.counts) == 2
    with pytest.raises(ValueError, match="on_error"):
        read_all("financial_code", tmp_path / "a.jsonl", on_error="ignore")


# --- OpenStax: a book repository's collection and CNXML modules ---

COLLECTION = """<col:collection xmlns:col="http://cnx.rice.edu/collxml" xmlns:md="http://cnx.rice.edu/mdml"
    xmlns="http://cnx.rice.edu/collxml">
  <col:metadata>
    <md:title>Introduction to Python Programming</md:title>
    <md:slug>introduction-python-programming</md:slug>
    <md:license url="http://creativecommons.org/licenses/by/4.0/"/>
  </col:metadata>
  <col:content>
    <col:module document="m00000"/>
    <col:subcollection>
      <md:title>Chapter 1: Statements</md:title>
      <col:content>
        <col:module document="m00001"/>
        <col:module document="m00002"/>
      </col:content>
    </col:subcollection>
    {extra}
  </col:content>
</col:collection>"""


def cnxml(title: str, body: str) -> str:
    return f"""<document xmlns="http://cnx.rice.edu/cnxml" xmlns:m="http://www.w3.org/1998/Math/MathML">
  <title>{title}</title>
  <metadata xmlns:md="http://cnx.rice.edu/mdml"><md:title>{title}</md:title>
    <md:content-id>m0</md:content-id></metadata>
  <content>{body}</content>
</document>"""


MODULES = {
    "m00000": cnxml("Preface", "<para id='p0'>Welcome.</para>"),
    "m00001": cnxml("Output and input", """
    <section id="s1">
      <title>Basic output</title>
      <para id="p1"> Output is produced with
        <code class="python">print(data)</code>, as in <emphasis>most</emphasis> languages.<newline/>
        The area is <m:math><m:mi>x</m:mi><m:mo>+</m:mo><m:mn>1</m:mn></m:math>.</para>
      <list id="l1"><item>print()</item><item>input()</item></list>
      <code display="block">
for i in range(2):
    print(i)
      </code>
      <media alt="slides"><iframe src="https://example.org"/></media>
    </section>"""),
    "m00002": cnxml("Variables", "<para id='p2'>A variable names a value.</para>"),
}


def openstax_book(root: Path, modules: dict[str, str] = MODULES, extra: str = "") -> Path:
    for module_id, text in modules.items():
        (root / "modules" / module_id).mkdir(parents=True)
        (root / "modules" / module_id / "index.cnxml").write_text(text)
    (root / "collections").mkdir()
    path = root / "collections" / "introduction-python-programming.collection.xml"
    path.write_text(COLLECTION.replace("{extra}", extra))
    return path


def test_openstax_chapters_from_collection_and_modules(tmp_path):
    preface, chapter = read_all("openstax", openstax_book(tmp_path))
    assert preface.text == "Preface\n\nWelcome."
    assert chapter.text == (
        "Chapter 1: Statements\n\nOutput and input\n\nBasic output\n\n"
        "Output is produced with print(data), as in most languages.\nThe area is x+1.\n\n"
        "- print()\n\n- input()\n\nfor i in range(2):\n    print(i)\n\nVariables\n\nA variable names a value.")
    assert chapter.metadata == {"book": "Introduction to Python Programming", "slug": "introduction-python-programming",
                                "license": "http://creativecommons.org/licenses/by/4.0/",
                                "chapter": "Chapter 1: Statements", "modules": ["m00001", "m00002"]}


def test_openstax_bad_module_names_chapter_and_module(tmp_path):
    modules = {**MODULES, "m00002": "<document xmlns='http://cnx.rice.edu/cnxml'>\n<content><para></content>"}
    extra = "<col:subcollection><md:title>Chapter 2: Gone</md:title><col:content>" \
            "<col:module document='m00009'/></col:content></col:subcollection>" \
            "<col:subcollection><md:title>Chapter 3: Out</md:title><col:content>" \
            "<col:module document='../../secret'/></col:content></col:subcollection>"
    path = openstax_book(tmp_path, modules, extra)
    with pytest.raises(SourceError, match=r"collection\.xml chapter 'Chapter 1: Statements': module .*m00002"
                                          r"/index\.cnxml line 2: not well-formed XML"):
        read_all("openstax", path)
    skipped = Skipped()
    [preface] = read_all("openstax", path, on_error="skip", skipped=skipped)
    assert preface.metadata["chapter"] is None and skipped.counts[path] == 3
    assert skipped.first[path].startswith("chapter 'Chapter 1: Statements': module ")


def test_openstax_collection_not_xml_is_an_error(tmp_path):
    path = openstax_book(tmp_path)
    path.write_text('<col:collection xmlns:col="http://cnx.rice.edu/collxml">\n<oops')
    with pytest.raises(SourceError, match=r"collection\.xml line 2: not well-formed XML"):
        read_all("openstax", path, on_error="skip")


# --- Stack Overflow: Posts.xml of the Stack Exchange dump ---

def row(**attributes) -> str:
    return "  <row " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in attributes.items()) + " />"


QUESTION_BODY = ("<p>How do I sum a <code>list</code>?</p>\n<pre><code>xs = [1, 2]\nif xs &lt; ys:\n"
                 "    total = 0\n</code></pre>\n<ul><li>fast</li><li>clear</li></ul>")


def posts_xml(path: Path, rows: list[str]) -> Path:
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + "\n</posts>\n")
    return path


POSTS = [
    row(Id=1, PostTypeId=1, AcceptedAnswerId=3, Score=12, Title="Sum a list", Body=QUESTION_BODY,
        Tags="<python><list>", AnswerCount=3),
    row(Id=2, PostTypeId=2, ParentId=1, Score=5, Body="<p>Use a loop.</p>"),
    row(Id=3, PostTypeId=2, ParentId=1, Score=1, Body="<p>Use <code>sum(xs)</code>.</p>"),
    row(Id=4, PostTypeId=5, Score=0, Body="<p>Tag wiki.</p>"),
    row(Id=5, PostTypeId=1, Score=0, Title="Empty?", Body="<p>Why&nbsp;not?</p>", Tags="|python|"),
    row(Id=6, PostTypeId=2, ParentId=1, Score=10, Body="<p>Use numpy.<br/>Or not.</p>"),
]


def test_stackoverflow_questions_with_answers_accepted_first_then_by_score(tmp_path):
    first, second = read_all("stackoverflow", posts_xml(tmp_path / "Posts.xml", POSTS))
    assert first.text == ("Q: Sum a list\n\nHow do I sum a list?\n\nxs = [1, 2]\nif xs < ys:\n    total = 0\n\n"
                          "- fast\n\n- clear\n\nA: Use sum(xs).\n\nA: Use numpy.\nOr not.\n\nA: Use a loop.")
    assert first.metadata == {"question_id": 1, "title": "Sum a list", "tags": ["python", "list"], "score": 12,
                              "accepted_answer_id": 3, "answer_ids": [3, 6, 2]}
    assert second.text == "Q: Empty?\n\nWhy not?" and second.metadata["tags"] == ["python"]


def test_stackoverflow_bad_row_names_its_line(tmp_path):
    path = posts_xml(tmp_path / "Posts.xml", POSTS + [row(Id=7, PostTypeId=2, ParentId=5, Score="high", Body="x"),
                                                      row(Id=8, PostTypeId=1, Score=1, Body="no title"),
                                                      row(Id=2, PostTypeId=2, ParentId=5, Score=1, Body="again")])
    with pytest.raises(SourceError, match=r"Posts\.xml line 9: attribute 'Score' must be an integer, got 'high'"):
        read_all("stackoverflow", path)
    skipped = Skipped()
    documents = read_all("stackoverflow", path, on_error="skip", skipped=skipped)
    assert len(documents) == 2 and skipped.counts[path] == 3
    assert skipped.first[path].startswith("line 9:")


def test_stackoverflow_malformed_xml_is_an_error(tmp_path):
    path = posts_xml(tmp_path / "Posts.xml", POSTS[:2] + ['  <row Id="9" Body="<p>" />'])
    with pytest.raises(SourceError, match=r"Posts\.xml line 5: not well-formed XML"):
        read_all("stackoverflow", path, on_error="skip")


# --- Vision-text: webdataset tar shards ---

def test_vision_text_samples(tmp_path):
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG")
    path = tmp_path / "shard-000000.tar"
    with webdataset.TarWriter(str(path), mtime=0) as writer:
        writer.write({"__key__": "s/000001", "png": png, "txt": "def f(): pass",
                      "json": {"kind": "code", "language": "python"}})
        writer.write({"__key__": "s/000002", "jpg": jpeg, "txt": "A red square."})
    code, caption = read_all("vision_text", path)
    assert code.text == "def f(): pass" and code.image == png and code.source == "vision_text"
    assert code.metadata == {"language": "python", "key": "s/000001", "kind": "code", "image_format": "png"}
    assert caption.image == jpeg and caption.metadata == {"key": "s/000002", "kind": "caption", "image_format": "jpeg"}


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_vision_text_bad_samples(tmp_path):
    png = image_bytes("PNG")
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "ok/1.png", png), add_member(tar, "ok/1.txt", b"fine")
        add_member(tar, "../evil.png", png), add_member(tar, "../evil.txt", b"x")           # escapes
        add_member(tar, "/abs/2.png", png), add_member(tar, "/abs/2.txt", b"x")             # absolute
        add_member(tar, "3.png", png)                                                        # no text
        add_member(tar, "4.jpg", png), add_member(tar, "4.txt", b"x")                        # not a JPEG
        add_member(tar, "5.png", png), add_member(tar, "5.txt", b"x"), add_member(tar, "5.json", b'{"kind": "x"}')
        add_member(tar, "6.png", kind=tarfile.SYMTYPE), add_member(tar, "6.txt", b"x")     # a link
        add_member(tar, "ok/7.png", png), add_member(tar, "ok/7.txt", b"also fine")
    with pytest.raises(SourceError, match=r"shard\.tar sample '\.\./evil': member '\.\./evil\.png' escapes"):
        read_all("vision_text", path)
    skipped = Skipped()
    documents = read_all("vision_text", path, on_error="skip", skipped=skipped)
    assert [d.text for d in documents] == ["fine", "also fine"] and skipped.counts[path] == 6


def test_vision_text_damaged_tar_is_an_error(tmp_path):
    path = tmp_path / "shard.tar"
    with webdataset.TarWriter(str(path), mtime=0) as writer:
        writer.write({"__key__": "1", "png": image_bytes("PNG"), "txt": "x" * 5000})
    path.write_bytes(path.read_bytes()[:3000])   # png member, txt header, part of the txt
    with pytest.raises(SourceError, match=r"shard\.tar: not a readable tar archive"):
        read_all("vision_text", path, on_error="skip")
