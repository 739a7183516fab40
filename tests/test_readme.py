"""The README's examples print what the README shows (issue 17: its outputs had drifted).

Every fenced block whose lines start with ``$ step3-jax`` is an example: each ``$`` command
(a trailing ``\\`` continues it) is followed by what it prints. The command runs in-process
(``cli.main``) and its output is compared line for line, or as JSON where the command has
``--json``. Lines starting ``step3-jax: `` are its log lines on stderr; the others its stdout.
Progress bars on stderr are not shown in the README and not compared.

Varying fields are masked by the explicit rules below and nothing else: JSON values whose key
is a time or a rate (:data:`VARYING_KEYS`: compared as numbers), the timings in log and plan
lines (:data:`VARYING_TEXT`), and ``...`` in a README line, which stands for a path. Examples
too slow for the default run are listed in :data:`NOT_RUN` with the reason; the test checks
that list against the README too, so it cannot go stale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex

import pytest

from conftest import ROOT, run_cli

VARYING_KEYS = re.compile(r"(_s|_ms|_per_s|_ms_per_layer|bubble_fraction)$")
VARYING_TEXT = [  # (pattern, replacement), applied to the README's line and the printed one
    (re.compile(r"\d+\.\d+ ms/step, compile \d+\.\d+ s$"), "# ms/step, compile # s"),
    (re.compile(r"loop MoE kernel, \d+\.\d+ s\)"), "loop MoE kernel, # s)"),
    (re.compile(r"has \d+\.\d+ GB available$"), "has # GB available"),  # this machine's, now
]
NOT_RUN = {  # command prefix -> why the default run does not run it
    "step3-jax launch": "starts 2 JAX processes (20-50 s); tests/test_distributed.py runs it",
    "step3-jax plan": "its compiled check starts a 32-device child process (15-30 s); "
                      "tests/test_plan.py checks the plan and the check on smaller settings",
}
DEVICES_FLAG = "XLA_FLAGS=--xla_force_host_platform_device_count=8"


@dataclasses.dataclass
class Example:
    command: str
    output: list[str]
    line: int  # where the command is in README.md

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)[1:]


def examples() -> list[Example]:
    """Every ``$ step3-jax`` command in a fenced block of README.md, with its output lines."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found, fenced, current = [], False, None
    for number, text in enumerate(lines, 1):
        if text.startswith("```"):
            fenced, current = not fenced, None
            continue
        if not fenced:
            continue
        if text.startswith("$ "):
            current = None
            if text == f"$ export {DEVICES_FLAG}":  # conftest.py sets it for every test
                continue
            assert text.startswith("$ step3-jax "), f"README.md:{number}: {text}"
            current = Example(text[2:], [], number)
            found.append(current)
        elif current is not None and current.command.endswith("\\"):
            current.command = current.command[:-1].rstrip() + " " + text.strip()
        elif current is not None:
            current.output.append(text)
    return found


def _runs(example: Example) -> bool:
    return not any(example.command.startswith(prefix) for prefix in NOT_RUN)


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _matches(shown: str, printed: str) -> bool:
    for pattern, replacement in VARYING_TEXT:
        shown, printed = pattern.sub(replacement, shown), pattern.sub(replacement, printed)
    return re.fullmatch(".*".join(map(re.escape, shown.split("..."))), printed) is not None


def _compare_json(shown, printed, where: str = "") -> None:
    """Equal, except that a value under a :data:`VARYING_KEYS` key only has to be a number (or
    null on both sides)."""
    if isinstance(shown, dict):
        assert isinstance(printed, dict) and set(shown) == set(printed), where
        for key in shown:
            if VARYING_KEYS.search(key):
                both_none = shown[key] is None and printed[key] is None
                numbers = all(isinstance(v, (int, float)) for v in (shown[key], printed[key]))
                assert both_none or numbers, f"{where}.{key}"
            else:
                _compare_json(shown[key], printed[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(printed, list) and len(shown) == len(printed), where
        for i, (a, b) in enumerate(zip(shown, printed)):
            _compare_json(a, b, f"{where}[{i}]")
    else:
        assert shown == printed, where


EXAMPLES = examples()


def test_the_readme_has_examples_and_every_one_not_run_is_named():
    commands = [e.command for e in EXAMPLES]
    assert len([e for e in EXAMPLES if _runs(e)]) >= 8
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in commands), f"NOT_RUN names no example: {prefix}"
    assert DEVICES_FLAG.split("=", 1)[1] in os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if _runs(e)],
                         ids=lambda e: f"README.md:{e.line}")
def test_a_readme_example_prints_what_the_readme_shows(capsys, example):
    code, out, err = run_cli(capsys, *example.argv)
    shown = _trim(example.output)
    # An example that shows an error line shows a refusal: exit 2; any other exits 0.
    refused = any(line.startswith("step3-jax: error: ") for line in shown)
    assert code == (2 if refused else 0), err
    logs = [line for line in err.replace("\r", "\n").splitlines()
            if line.startswith("step3-jax: ")]
    shown_logs = [line for line in shown if line.startswith("step3-jax: ")]
    assert len(logs) == len(shown_logs), (shown_logs, logs)
    assert all(_matches(a, b) for a, b in zip(shown_logs, logs)), (shown_logs, logs)
    shown_out = [line for line in shown if not line.startswith("step3-jax: ")]
    if "--json" in example.argv:
        _compare_json(json.loads("\n".join(shown_out)), json.loads(out))
        return
    printed = _trim(out.splitlines())
    assert len(printed) == len(shown_out), "\n".join(printed)
    for a, b in zip(shown_out, printed):
        assert _matches(a, b), f"README shows:\n{a}\nprinted:\n{b}"
