"""The README's derivation and variants tables point a reader at functions and tests: each must exist."""
import ast
import fnmatch
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def derivation_rows():
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("## Derivation -> code")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    cells = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]
    return [(row[0], row[-2], row[-1]) for row in cells]  # (what, code, tests): the first and the last two columns


def names_defined(path):
    """Every function, class and method name defined in a file."""
    tree = ast.parse(open(path).read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_function_the_derivation_table_names_exists_in_the_file_it_names():
    rows = derivation_rows()
    assert len(rows) >= 10, "the derivation table was not found in README.md"
    checked = 0
    for equation, code, tests in rows:
        names = re.findall(r"`([^`]+)`", code)
        files = [n for n in names if n.endswith(".py")]
        if not files:
            continue
        defined = set().union(*(names_defined(os.path.join(ROOT, f)) for f in files))
        for name in names:
            if not name.endswith(".py"):
                assert name in defined, f"README names {name} in {files} for {equation!r}, but it is not defined there"
                checked += 1
    assert checked >= 10


def test_every_test_the_derivation_table_names_exists():
    defined = set().union(*(names_defined(os.path.join(ROOT, "tests", f))
                            for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")))
    for equation, code, tests in derivation_rows():
        for pattern in re.findall(r"`(test_[^`]+)`", tests):
            assert fnmatch.filter(defined, pattern), f"README cites {pattern} for {equation!r}, but no test has that name"
