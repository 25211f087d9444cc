"""Mutation probe of trt_bot.py's pure parts: how many small bugs do the tests catch?

Each mutant changes one operator or constant in one of the functions PARTS
lists (``<`` for ``<=``, ``and`` for ``or``, ``n`` for ``n + 1``, a dropped
``not``, ``True`` for ``False``), then the pure tests of its part (the plain
``def test_*`` of the sections PARTS names) run against it in a scratch copy of
the repository.  A mutant the tests still pass "survived": either a
test is missing or the mutant does the same thing (an equivalent mutant).

    .venv/bin/python bench/mutate.py              # every part; prints survivors and the score
    .venv/bin/python bench/mutate.py plan_webhook  # only the functions whose name contains one of these
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each part: the functions mutated, and the sections of the test files whose plain (not async) tests are the
# pure tests of that part: (test file, the banner that opens the section, the banner that opens the next one).
PARTS = {
    "HTTP parser": (["RequestParser.next_head", "RequestParser.next_request", "RequestParser._parse_head",
                     "RequestParser._parse_head_bytes", "RequestParser._body_length_from"],
                    [("test_trt_bot.py", "# 3. HTTP parsing", "# 4. HTTP server")]),
    "job machine": (["apply_event"], [("test_generation.py", "# 12. Generation jobs: the state machine",
                                       "# 12. Generation jobs: durability")]),
    "webhook plan": (["plan_webhook"], [("test_trt_bot.py", "# 14. Application", None)]),
    "send pacer": (["TelegramClient.chat_wait", "TelegramClient.send_wait", "TelegramClient.take_send",
                    "TelegramClient.pause_sends"],
                   [("test_trt_bot.py", "# 6. Retry and pacing", "# 7. Telegram client")]),
    "Bot API parsing": (["parse_bot_api_response", "_telegram_wait_asked"],
                        [("test_trt_bot.py", "# 6. Retry and pacing", "# 9. Update pipeline")]),
    "Kie parsing, URL checks": (["parse_kie_envelope", "parse_task_record", "split_result_url", "_is_ip_literal"],
                                [("test_generation.py", "# 8. Kie client", "# 11. Dialog")]),
    "settings parsers": (["_integer", "_fractional_seconds", "_flag", "_secret", "_webhook_secret",
                          "parse_database_url", "database_passwords"],
                         [("test_trt_bot.py", "# 1. Configuration", "# 2. Logging")]),
}
NOT_PURE = {"test_no_log_record_in_the_whole_suite_contains_a_secret"}  # reads the records of the whole run
SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.And: ast.Or, ast.Or: ast.And,
         ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


def pure_tests(sections: list[tuple[str, str, str | None]]) -> list[str]:
    ids = []
    for name, first, last in sections:
        source = open(os.path.join(HERE, name)).read()
        start = source.index(first)
        end = source.index(last) if last else len(source)
        start_line, end_line = source.count("\n", 0, start), source.count("\n", 0, end)
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and node.name not in NOT_PURE:
                if start_line < node.lineno <= end_line:
                    ids.append(f"{name}::{node.name}")
    return ids


def find_function(module: ast.Module, qualname: str) -> ast.FunctionDef:
    scope: list[ast.stmt] = module.body
    *classes, name = qualname.split(".")
    for class_name in classes:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == class_name).body
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


def mutations(node: ast.AST) -> list[str]:
    """The mutations this node allows, as labels ``apply`` understands."""
    if isinstance(node, ast.Compare):
        return [f"op{i}" for i, op in enumerate(node.ops) if type(op) in SWAPS]
    if isinstance(node, (ast.BoolOp, ast.BinOp)) and type(node.op) in SWAPS:
        return ["op"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ["drop not"]
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ["flip"]
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return ["+1"]
    return []


def apply(node: ast.AST, label: str) -> ast.AST:
    if label.startswith("op") and isinstance(node, ast.Compare):
        i = int(label[2:])
        node.ops[i] = SWAPS[type(node.ops[i])]()
    elif label == "op":
        node.op = SWAPS[type(node.op)]()
    elif label == "drop not":
        return node.operand
    elif label == "flip":
        node.value = not node.value
    elif label == "+1":
        node.value = node.value + 1
    return node


class Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, label: str):
        self.target, self.label = target, label

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        return apply(node, self.label) if node is self.target else node


def mutants(source: str, qualname: str):
    """(description, mutated module source) for every mutation point of ``qualname``."""
    points = []
    function = find_function(ast.parse(source), qualname)
    body = function.body[1:] if ast.get_docstring(function) else function.body
    for statement_index, statement in enumerate(body):
        for node_index, node in enumerate(ast.walk(statement)):
            for label in mutations(node):
                points.append((statement_index, node_index, label, node.lineno))
    for statement_index, node_index, label, line in points:
        module = ast.parse(source)
        function = find_function(module, qualname)
        body = function.body[1:] if ast.get_docstring(function) else function.body
        target = list(ast.walk(body[statement_index]))[node_index]
        shown = ast.unparse(target)
        body[statement_index] = Replace(target, label).visit(body[statement_index])
        yield f"{qualname} line {line}: {label} in {shown[:70]}", ast.unparse(module)


def run_tests(folder: str, tests: list[str]) -> bool:
    """True if the tests pass."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False  # a mutant that hangs is caught
    return done.returncode == 0


def main(only: list[str]) -> int:
    source = open(os.path.join(HERE, "trt_bot.py")).read()
    killed_in_all, total_in_all, started = 0, 0, time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        for name in ("conftest.py", "pytest.ini", "test_trt_bot.py", "test_generation.py", "README.md"):
            shutil.copy(os.path.join(HERE, name), folder)
        for part, (functions, sections) in PARTS.items():
            chosen = [name for name in functions if not only or any(word in name for word in only)]
            if not chosen:
                continue
            tests = pure_tests(sections)
            with open(os.path.join(folder, "trt_bot.py"), "w") as file:
                file.write(ast.unparse(ast.parse(source)))
            if not run_tests(folder, tests):
                print(f"{part}: the pure tests fail on the unmutated file: nothing to measure")
                return 2
            killed = total = 0
            for qualname in chosen:
                for description, mutated in mutants(source, qualname):
                    with open(os.path.join(folder, "trt_bot.py"), "w") as file:
                        file.write(mutated)
                    total += 1
                    if run_tests(folder, tests):
                        print("survived:", description, flush=True)
                    else:
                        killed += 1
            print(f"{part}: {killed} of {total} killed, {len(tests)} tests", flush=True)
            killed_in_all, total_in_all = killed_in_all + killed, total_in_all + total
    print(f"{killed_in_all} of {total_in_all} mutants killed ({100 * killed_in_all / max(total_in_all, 1):.1f}%) "
          f"in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
