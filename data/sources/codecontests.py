"""CodeContests (deepmind/code_contests, the AlphaCode fine-tuning set): one problem per JSON line,
the dataset's rows as `datasets` writes them (to_json of its parquet): name, description,
public_tests/private_tests/generated_tests {input, output}, source, difficulty,
solutions/incorrect_solutions {language: [id], solution: [text]}, cf_contest_id, cf_index,
cf_points, cf_rating, cf_tags, time_limit, memory_limit_bytes, ...

Document text = the problem's name and statement, then its first correct solution in each language
(in the order the languages first appear): one per language, because a problem has up to hundreds of
solutions and repeating the statement for each would weigh statements by their solution count.
Language ids and source ids are named as the dataset card defines them.
"""

from pathlib import Path
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, RecordError, Skipped
from cromwell.data.sources.fields import optional, require
from cromwell.data.sources.jsonl import read_jsonl
from cromwell.data.sources.record import Document

SOURCE = "codecontests"
# PYTHON is Python 2, as on the card.
LANGUAGES = {0: "UNKNOWN_LANGUAGE", 1: "PYTHON", 2: "CPP", 3: "PYTHON3", 4: "JAVA"}
SOURCES = {0: "UNKNOWN_SOURCE", 1: "CODECHEF", 2: "CODEFORCES", 3: "HACKEREARTH", 4: "CODEJAM", 5: "ATCODER",
           6: "AIZU"}


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_jsonl(path, _document, on_error, skipped)


def _document(record: dict[str, Any]) -> Document:
    name = require(record, "name", str)
    languages = require(record, "solutions.language", list[int])
    solutions = require(record, "solutions.solution", list[str])
    if len(languages) != len(solutions):
        raise RecordError(f"solutions has {len(languages)} languages for {len(solutions)} solutions")
    first: dict[str, str] = {}
    for language, solution in zip(languages, solutions):
        first.setdefault(_named(LANGUAGES, language, "solutions.language"), solution)
    source = optional(record, "source", int)
    parts = [name, require(record, "description", str)]
    parts += [f"Solution ({language}):\n{solution}" for language, solution in first.items()]
    return Document(
        text="\n\n".join(parts),
        source=SOURCE,
        metadata={
            "name": name,
            "problem_source": None if source is None else _named(SOURCES, source, "source"),
            "difficulty": optional(record, "difficulty", int),
            "cf_rating": optional(record, "cf_rating", int),
            "cf_tags": optional(record, "cf_tags", list[str]),
            "solution_languages": list(first),
        },
    )


def _named(names: dict[int, str], value: int, field: str) -> str:
    if value not in names:
        raise RecordError(f"field '{field}' has unknown id {value}")
    return names[value]
