"""The JavaScript client's copy of the contract is jobwire/protocol.py's, name by name.

`js/jobwire.js` cannot import Python, so it keeps its own `Op`, `Msg` and `Close` (and the
terminal close codes, the final states, the expiry message). A copy drifts silently: a
message type renamed on the server would simply never match in browsers. Here the real
module is evaluated by `node` and every name and value is held to the Python classes; a
missing or extra name fails, saying which. (tests/test_js_package.py holds the hand-written
types in js/jobwire.d.ts to the same classes.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from jobwire import protocol
from tests.support import ROOT

MODULE = ROOT / "js" / "jobwire.js"
NODE = shutil.which("node") or ""

if not NODE:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the JavaScript client's tests: install Node.js >= 20")
    pytest.skip(
        "node is not installed: the JavaScript client's contract is not checked", allow_module_level=True
    )

# Prints the module's contract exports as JSON, with whether each object is frozen.
DUMP = """
const m = await import(process.argv[1]);
const plain = (o) => ({ frozen: Object.isFrozen(o), names: { ...o } });
console.log(JSON.stringify({
  Op: plain(m.Op),
  Msg: plain(m.Msg),
  Close: plain(m.Close),
  TERMINAL_CLOSE_CODES: [...m.TERMINAL_CLOSE_CODES].sort((a, b) => a - b),
  FINAL_STATES: [...m.FINAL_STATES].sort(),
  TOKEN_EXPIRED: m.TOKEN_EXPIRED,
}));
"""


@pytest.fixture(scope="module")
def js() -> dict[str, Any]:
    out = subprocess.run(
        [NODE, "--input-type=module", "-e", DUMP, MODULE.as_uri()],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def names_of(cls: type) -> dict[str, Any]:
    """A contract class's names: its upper-case attributes."""
    return {name: value for name, value in vars(cls).items() if name.isupper()}


def differences(python: dict[str, Any], javascript: dict[str, Any]) -> list[str]:
    missing = [f"{n} missing in JS (Python: {python[n]!r})" for n in python if n not in javascript]
    extra = [f"{n} in JS only ({javascript[n]!r})" for n in javascript if n not in python]
    changed = [
        f"{n}: JS {javascript[n]!r}, Python {python[n]!r}"
        for n in python
        if n in javascript and javascript[n] != python[n]
    ]
    return missing + extra + changed


@pytest.mark.parametrize("cls", [protocol.Op, protocol.Msg, protocol.Close], ids=lambda c: c.__name__)
def test_js_names_and_values_match_the_protocol_class(js: dict[str, Any], cls: type) -> None:
    mirrored = js[cls.__name__]
    assert differences(names_of(cls), mirrored["names"]) == []
    assert mirrored["frozen"], f"{cls.__name__} in js/jobwire.js must be frozen (Object.freeze)"


def test_js_terminal_close_codes_final_states_and_expiry_message_match(js: dict[str, Any]) -> None:
    assert js["TERMINAL_CLOSE_CODES"] == sorted(protocol.TERMINAL_CLOSE_CODES)
    assert js["FINAL_STATES"] == sorted(protocol.FINAL_STATES)
    assert js["TOKEN_EXPIRED"] == protocol.TOKEN_EXPIRED


def test_the_check_names_what_differs() -> None:
    """A name the JS lacks, one only it has, and one whose value differs are each named."""
    python = {"SUBSCRIBE": "subscribe", "PING": "ping", "AUTH": "auth"}
    javascript = {"SUBSCRIBE": "subscribe", "AUTH": "login", "EXTRA": "x"}
    assert differences(python, javascript) == [
        "PING missing in JS (Python: 'ping')",
        "EXTRA in JS only ('x')",
        "AUTH: JS 'login', Python 'auth'",
    ]


def test_the_client_uses_the_contract_names_not_literals() -> None:
    """Ops and message types are spelled once, in the frozen objects: the rest of the module
    refers to them (`Op.SUBSCRIBE`, `Msg.EVENT`), so renaming one renames it everywhere."""
    source = MODULE.read_text()
    body = source[source.index("export class JobwireClient") :]
    for cls in (protocol.Op, protocol.Msg):
        for name, value in names_of(cls).items():
            for quoted in (f'"{value}"', f"'{value}'"):
                # `op: "subscribe"` or `type === "event"`; prose in comments does not count
                code = [line for line in body.splitlines() if quoted in line.split("//")[0]]
                assert not code, f"{cls.__name__}.{name} written as a literal {quoted}: {code}"
