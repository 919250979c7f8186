"""Plain text from markup (HTML, CNXML): paragraphs apart, code verbatim.

Whitespace in running text is collapsed, since there it is the markup's indentation and line
wrapping, not content; in code it is content, so verbatim blocks keep it (only their common
indentation and surrounding blank lines go).
"""

import re
import textwrap

_SPACE = re.compile(r"\s+")


class TextBuilder:
    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._lines: list[list[str]] = [[]]

    def text(self, text: str) -> None:
        self._lines[-1].append(text)

    def line_break(self) -> None:
        self._lines.append([])

    def block_break(self) -> None:
        lines = (_SPACE.sub(" ", "".join(pieces)).strip() for pieces in self._lines)
        block = "\n".join(line for line in lines if line)
        if block:
            self._blocks.append(block)
        self._lines = [[]]

    def verbatim(self, code: str) -> None:
        self.block_break()
        code = textwrap.dedent(code).strip("\n").rstrip()
        if code:
            self._blocks.append(code)

    def result(self) -> str:
        self.block_break()
        return "\n\n".join(self._blocks)
