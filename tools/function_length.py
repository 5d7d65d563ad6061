"""make lint: no function in taskpool/ longer than MAX_LINES lines (ruff checks complexity).

A function is measured from its `def` (or first decorator) to its last line, docstring and
comments included: what a reader has to take in at once.
"""

from __future__ import annotations

import ast
import pathlib
import sys

MAX_LINES = 60


def long_functions(root: pathlib.Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > MAX_LINES:
                    found.append(f"{path}:{node.lineno}: {node.name} is {lines} lines "
                                 f"(at most {MAX_LINES})")
    return found


if __name__ == "__main__":
    problems = long_functions(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "taskpool"))
    print("\n".join(problems) or "function length: ok")
    sys.exit(1 if problems else 0)
