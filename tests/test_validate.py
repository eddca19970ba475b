"""``load_flows`` and ``omnigate flows validate|schema``: every problem a designer can make,
reported at its exact file:line:column with its hint, on the broken fixtures
(tests/fixtures/flows/broken/*: each line marked ``<-`` there is an expected problem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from flows.actions import InProcessActions
from flows.validate import Problem, json_schema, load_flows
from flows.yamlpos import load_yaml
from gateway.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path("tests/fixtures/flows")  # relative: messages name files as given
BROKEN = FIXTURES / "broken"
EXAMPLES = Path("examples/flows")
SCHEMA_FILE = ROOT / "docs" / "flows.schema.json"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the repository root (relative paths in messages), no OMNIGATE_* settings."""
    monkeypatch.chdir(ROOT)
    for name in ("OMNIGATE_FLOWS_DIR", "OMNIGATE_ACTIONS_PACKAGE", "OMNIGATE_ACTION_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)


def shown(problems: list[Problem], root: Path) -> list[str]:
    """Problems as printed, with the fixture directory left out of the file names."""
    return [str(p).removeprefix(f"{root}/") for p in problems]


def _dup(what: str, where: str) -> str:
    return f"{what} is already defined at {where} (hint: a name is defined once per flows " \
           "directory: rename or remove one)"


SEMANTICS = BROKEN / "semantics"
SEMANTIC_ERRORS = [
    # checks.yaml
    "checks.yaml:3:3: entity 'nothing' has neither a pattern nor values "
    "(hint: add 'pattern: <regex>' or 'values: [...]')",
    "checks.yaml:6:25: bad regular expression: unterminated character set at position 0 "
    "(hint: a Python regular expression)",
    "checks.yaml:9:21: 'min' (5.0) is above 'max' (1.0): no answer can be valid",
    "checks.yaml:14:14: intent 'order_status' is already global "
    "(hint: one global entry per intent)",
    # domain.yaml: duplicate intent examples, across intents (case and spaces do not
    # count) and within one intent
    f"domain.yaml:6:16: duplicate example 'Where is  my ORDER': already an example of intent "
    f"'order_status' ({SEMANTICS}/domain.yaml:4:16) "
    "(hint: an example teaches one intent, once: remove one)",
    f"domain.yaml:6:50: duplicate example 'track it': already an example of this intent "
    f"({SEMANTICS}/domain.yaml:6:38) (hint: an example teaches one intent, once: remove one)",
    "domain.yaml:12:16: synonyms for 'green', which is not one of the values "
    "(hint: add it to values:)",
    "domain.yaml:15:13: unknown entity 'order_no' (hint: define it under entities:)",
    "domain.yaml:17:11: choice slot 'size' has no choices "
    "(hint: add 'choices: [first, second]')",
    "domain.yaml:20:8: unknown slot 'nmae' in template 'Hi {nmae}, what can I do?' "
    "(hint: did you mean name?)",
    "domain.yaml:22:31: unknown flow 'order' (hint: define it under flows:)",
    "domain.yaml:24:14: unknown intent 'humans' (hint: did you mean human?)",
    "domain.yaml:25:14: intent 'human' is global and also starts flow 'agent' "
    "(hint: use one or the other)",
    "domain.yaml:25:25: unknown flow 'escalate' "
    "(hint: do is handoff, restart, cancel, menu or a flow name)",
    # flows.yaml
    "flows.yaml:3:20: unknown intent 'order_stat' (hint: did you mean order_status?)",
    "flows.yaml:6:14: unknown slot 'order_numbr' (hint: did you mean order_number?)",
    "flows.yaml:8:18: on_fail 'nowhere' is not a step id in flow 'order_status' nor a flow "
    "(hint: use handoff, cancel, a step id in this flow, or a flow name)",
    "flows.yaml:9:15: unknown slot 'colour' "
    "(hint: 'colour' is an entity: declare a slot with 'entity: colour')",
    "flows.yaml:10:14: unknown slot 'status' in template "
    "'Order {order_number} for {profile.email} of {contact.name}: {status}' "
    "(hint: declare it under slots:, or use {profile.key} / {contact.name})",
    "flows.yaml:11:14: bad template 'Bad {template': expected '}' before end of string "
    "(hint: fields are {slot}, {profile.key} or {contact.name}; write {{ or }} for a brace)",
    "flows.yaml:12:13: bad condition 'order_number = 1': invalid syntax "
    "(hint: a Python-like expression: order_state == 'shipped' and attempts < 3)",
    "flows.yaml:14:13: unknown slot 'status' in condition "
    "\"status == 'shipped' and len(order_number) > 3\" "
    "(hint: conditions read slots: declare it under slots:)",
    "flows.yaml:16:17: action 'action_check_ordr' is not registered "
    "(hint: did you mean action_check_order?)",
    "flows.yaml:18:16: unknown slot 'state' (hint: declare it under slots:)",
    "flows.yaml:19:15: goto 'finish': no step with this id in flow 'order_status' and no flow "
    "of this name (hint: give the target step an 'id:', or name a flow)",
    "flows.yaml:20:9: unreachable step: nothing after the goto above runs "
    "(hint: move it before, or give it an id and goto it)",
    f"flows.yaml:27:13: duplicate step id 'ask_name' in flow 'returns' "
    f"(first at {SEMANTICS}/flows.yaml:24:13) (hint: step ids are unique within a flow)",
    "flows.yaml:30:13: button 'Both' needs exactly one of value or flow "
    "(hint: value: what the press answers; flow: the flow it starts)",
    "flows.yaml:31:13: button 'Neither' needs exactly one of value or flow "
    "(hint: value: what the press answers; flow: the flow it starts)",
    "flows.yaml:32:36: unknown flow 'refunds' (hint: did you mean returns?)",
    "flows.yaml:44:9: unreachable step: nothing after the if (both branches end) above runs "
    "(hint: move it before, or give it an id and goto it)",
    "flows.yaml:47:20: intent 'track' already starts flow 'branches' "
    "(hint: one intent starts one flow)",
    # more.yaml: names defined a second time, in another file
    "more.yaml:1:1: " + _dup("'bot_name'", f"{SEMANTICS}/domain.yaml:1:1"),
    "more.yaml:3:3: " + _dup("intent 'human'", f"{SEMANTICS}/domain.yaml:7:3"),
    "more.yaml:6:3: " + _dup("flow 'returns'", f"{SEMANTICS}/flows.yaml:22:3"),
]
SEMANTIC_WARNINGS = [
    "checks.yaml:11:5: slot 'sizes' has choices but is of type text "
    "(hint: set 'type: choice' to accept only these)",
    "flows.yaml:22:3: flow 'returns' is never started "
    "(hint: give it 'when: {intent: ...}', a menu option, a button or a goto)",
]

STRUCTURE = BROKEN / "structure"
STRUCTURE_ERRORS = [
    "shop.yaml:2:1: unknown field 'intens' at the top level (hint: did you mean intents?)",
    "shop.yaml:5:10: 'ttl': '3 weeks' is not a duration like 30m, 12h, 30d or 2w "
    "(hint: units: s, m, h, d, w (30m, 12h, 30d, 2w))",
    "shop.yaml:6:3: 'Order Number' is not a valid slot name "
    "(hint: names use lowercase letters, digits and _, starting with a letter)",
    "shop.yaml:10:9: unknown step kind 'sya' (hint: did you mean say?)",
    "shop.yaml:12:9: unknown field 'buttns' in a say step (hint: did you mean buttons?)",
    "shop.yaml:14:9: 'goto' is a step of its own in a say step "
    "(hint: one step does one thing: start a new step with '- goto: ...')",
    "shop.yaml:17:36: 'value' must be text, not 5 (hint: put it in quotes)",
    "shop.yaml:18:18: 'reason' is required in a handoff "
    "(hint: agents see the reason in their queue, e.g. 'asked for a refund')",
    "shop.yaml:19:18: 'resolve' must be true or a goodbye text, not 5",
    "shop.yaml:20:9: a step must be a mapping, not 'just some text' "
    "(hint: did you mean '- say: just some text'?)",
    "shop.yaml:23:19: 'attempts' must be at least 1, not 0",
    "vocab.yaml:3:10: 'examples' is required in intent 'greet' "
    "(hint: list a few phrases customers write for this intent)",
    "vocab.yaml:5:15: 'examples' needs at least 1 item(s)",
    "vocab.yaml:8:14: 'pattern': bad regular expression: unterminated character set at "
    "position 0 (hint: a Python regular expression)",
    "vocab.yaml:12:15: 'http' must be an http:// or https:// URL, not 'ftp://example.com/x'",
    "vocab.yaml:13:17: 'method' must be 'GET', 'POST', 'PUT', 'PATCH' or 'DELETE', not 'FETCH'",
    "vocab.yaml:14:40: 'priority' must be 'low', 'normal', 'high' or 'urgent', not 'asap'",
    "vocab.yaml:15:10: 'steps' is required in flow 'empty' "
    "(hint: a flow needs at least one step, e.g. '- say: Hello')",
]


def _marked_lines(path: Path) -> list[int]:
    """The lines a fixture marks with ``# <-`` (an expected problem each)."""
    return [n for n, line in enumerate(path.read_text().splitlines(), 1)
            if "# <-" in line and "warning" not in line]


# ------------------------------------------------------------------ semantics


def test_every_semantic_error_with_its_exact_place_and_hint() -> None:
    result = load_flows(SEMANTICS, actions={"action_check_order", "action_create_return"})
    assert result.domain is None and not result.ok
    assert shown(result.errors, SEMANTICS) == SEMANTIC_ERRORS
    assert shown(result.warnings, SEMANTICS) == SEMANTIC_WARNINGS
    assert [p.name for p in result.files] == ["checks.yaml", "domain.yaml", "flows.yaml",
                                              "more.yaml"]
    checks = [p.line for p in result.errors if p.file.name == "checks.yaml"]
    assert checks == _marked_lines(SEMANTICS / "checks.yaml")


def test_errors_are_sorted_by_file_then_position() -> None:
    result = load_flows(SEMANTICS)
    keys = [(str(p.file), p.line, p.column) for p in result.errors]
    assert keys == sorted(keys)
    assert len({p.file for p in result.errors}) == 4


def test_actions_are_checked_only_when_the_registered_names_are_known() -> None:
    unchecked = load_flows(SEMANTICS)
    assert not any("not registered" in p.message for p in unchecked.errors)
    assert shown(unchecked.errors, SEMANTICS) == [
        e for e in SEMANTIC_ERRORS if "not registered" not in e]
    nothing = load_flows(SEMANTICS, actions=set())
    [problem] = [p for p in nothing.errors if "not registered" in p.message]
    assert (problem.file.name, problem.line, problem.column) == ("flows.yaml", 16, 17)
    assert problem.hint == "no action is registered: check OMNIGATE_ACTIONS_PACKAGE"
    other = load_flows(SEMANTICS, actions={"greet_customer", "send_invoice"})
    [problem] = [p for p in other.errors if "not registered" in p.message]
    assert problem.hint == "registered: greet_customer, send_invoice"


def test_unstarted_flows_missing_menu_and_fallback_are_warnings_only() -> None:
    bare = BROKEN / "bare"
    result = load_flows(bare)
    assert result.ok and result.errors == []
    assert shown(result.warnings, bare) == [
        "flows.yaml:1:1: no fallback: a message the bot does not understand is never handed "
        "off (hint: add 'fallback: {say: ..., max_misses: 2, handoff: {reason: ...}}')",
        "flows.yaml:1:1: no menu: after a flow ends the bot offers no options "
        "(hint: add 'menu: {say: ..., options: [{title: ..., flow: ...}]}')",
        "flows.yaml:9:3: flow 'orphan' is never started "
        "(hint: give it 'when: {intent: ...}', a menu option, a button or a goto)",
    ]


# ------------------------------------------------------------------ structure


def test_every_structural_error_with_its_exact_place_and_hint() -> None:
    result = load_flows(STRUCTURE)
    assert result.domain is None
    assert shown(result.errors, STRUCTURE) == STRUCTURE_ERRORS
    for name in ("shop.yaml", "vocab.yaml"):
        lines = [p.line for p in result.errors if p.file.name == name]
        assert lines == _marked_lines(STRUCTURE / name), name


def test_a_yaml_syntax_error_is_placed_where_the_parser_gave_up() -> None:
    directory = BROKEN / "yaml"
    result = load_flows(directory)
    assert result.domain is None
    assert shown(result.errors, directory) == [
        "bad.yaml:5:14: YAML: found unexpected end of stream "
        "(while scanning a quoted scalar at line 5)"]
    assert [p.name for p in result.files] == ["bad.yaml", "good.yaml"]


@pytest.mark.parametrize(("text", "expected"), [
    ("flows:\n  a:\n    steps:\n\t- say: hi\n",
     "x.yaml:4:1: YAML: found character '\\t' that cannot start any token "
     "(hint: indent with spaces, not tabs)"),
    ("intents:\n  hi: {examples: [hi]}\n  hi: {examples: [hello]}\n",
     "x.yaml:3:3: YAML: found duplicate key \"hi\" with value \"{'examples': ['hello']}\" "
     "(original value: \"{'examples': ['hi']}\") (while constructing a mapping at line 2) "
     "(hint: a key may appear once per mapping: merge the two, or rename one)"),
    ("bot_name: Bot\n---\nbot_name: Other\n",
     "x.yaml:2:1: YAML: a second document starts here "
     "(hint: one document per file: remove the '---' line or split the file)"),
    ("greeting: Hello: welcome\n",
     "x.yaml:1:16: YAML: mapping values are not allowed here "
     "(hint: a text containing ': ' needs quotes)"),
    ("- say: hi\n",
     "x.yaml:1:1: a flow file is a mapping of sections (hint: start with one of: version, "
     "bot_name, greeting, intents, entities, slots, flows, menu, globals, fallback)"),
])
def test_yaml_mistakes(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "x.yaml").write_text(text)
    result = load_flows(tmp_path)
    assert shown(result.errors, tmp_path) == [expected]


def test_a_story_file_among_the_flow_files_is_pointed_to_stories(tmp_path: Path) -> None:
    for path in (ROOT / FIXTURES / "shop").glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "my_stories.yaml").write_text("stories:\n  - name: x\n    steps: []\n")
    result = load_flows(tmp_path)
    assert shown(result.errors, tmp_path) == [
        "my_stories.yaml:1:1: unknown field 'stories' at the top level "
        "(hint: this is a test story file: put it in the stories/ subdirectory)"]


def test_a_directory_without_flows_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a flow")
    (tmp_path / ".draft.yaml").write_text("editor: temp file")  # not a flow file
    [problem] = load_flows(tmp_path).errors
    assert problem.message == f"no flow files (*.yaml) in {tmp_path}"
    missing = tmp_path / "nope"
    [problem] = load_flows(missing).errors
    assert str(problem) == (f"{missing}:1:1: {missing} is not a directory (hint: point "
                            "OMNIGATE_FLOWS_DIR (or the DIR argument) at your flows)")


# ------------------------------------------------------------------- examples


def example_actions() -> set[str]:
    names = InProcessActions("examples.actions").registered()
    assert names == {"action_check_order", "action_create_return"}
    return names


def test_the_shipped_examples_validate_with_their_actions() -> None:
    result = load_flows(EXAMPLES, actions=example_actions())
    assert result.errors == [] and result.warnings == []
    assert result.domain is not None
    assert set(result.domain.flows) == {
        "human", "hours", "shipping", "returns_policy", "order_status", "start_return",
        "track_parcel"}
    # the stories beside the flows are not flow files
    assert (EXAMPLES / "stories").is_dir()
    assert all(p.parent == EXAMPLES for p in result.files)


def test_an_unregistered_action_in_a_copy_of_the_examples(tmp_path: Path) -> None:
    for path in EXAMPLES.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    orders = tmp_path / "orders.yaml"
    orders.write_text(orders.read_text().replace("action: action_check_order",
                                                 "action: action_chek_order"))
    result = load_flows(tmp_path, actions=example_actions())
    assert shown(result.errors, tmp_path) == [
        "orders.yaml:38:17: action 'action_chek_order' is not registered "
        "(hint: did you mean action_check_order?)"]


# ------------------------------------------------------------------------ CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["flows", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines() + out.err.splitlines()


def test_validate_command_as_a_subprocess() -> None:
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "flows", "validate", str(STRUCTURE)],
        cwd=ROOT, env=env_free, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:-1] == [f"{STRUCTURE}/{e}" for e in STRUCTURE_ERRORS]
    assert lines[-1] == f"{len(STRUCTURE_ERRORS)} errors, 0 warnings in 2 files of {STRUCTURE}"


def test_validate_command_errors_and_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_cli(capsys, "validate", str(SEMANTICS))
    assert code == 1
    expected = [e for e in SEMANTIC_ERRORS if "not registered" not in e]
    assert lines == [
        *(f"{SEMANTICS}/{e}" for e in expected),
        *(f"{SEMANTICS}/{w}".replace(": ", ": warning: ", 1) for w in SEMANTIC_WARNINGS),
        f"{len(expected)} errors, 2 warnings in 4 files of {SEMANTICS}",
    ]


def test_validate_command_ok_with_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_cli(capsys, "validate", str(FIXTURES / "shop"))
    assert code == 0
    assert lines == [f"ok: {FIXTURES / 'shop'} (2 files): 3 flows, 5 intents, 4 slots; "
                     "0 warnings; no custom actions configured: action names not checked"]


def test_validate_command_checks_actions_from_the_flag_or_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for path in EXAMPLES.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    # a copy of the examples: not the shipped directory, so no actions by default
    code, lines = run_cli(capsys, "validate", str(tmp_path))
    assert code == 0 and lines[-1].endswith("no custom actions configured: action names "
                                            "not checked")
    code, lines = run_cli(capsys, "validate", str(tmp_path), "--actions", "examples.actions")
    assert code == 0 and lines[-1].endswith(
        "action names checked against examples.actions (2)")
    orders = tmp_path / "orders.yaml"
    orders.write_text(orders.read_text().replace("action_check_order", "action_check"))
    monkeypatch.setenv("OMNIGATE_ACTIONS_PACKAGE", "examples.actions")
    code, lines = run_cli(capsys, "validate", str(tmp_path))
    assert code == 1
    assert lines[0] == (f"{tmp_path}/orders.yaml:38:17: action 'action_check' is not "
                        "registered (hint: did you mean action_check_order?)")


def test_validate_command_on_the_shipped_examples_uses_the_example_actions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines = run_cli(capsys, "validate")  # DIR defaults to OMNIGATE_FLOWS_DIR
    assert code == 0
    [line] = lines
    assert line.startswith(f"ok: {ROOT / 'examples' / 'flows'} (5 files): 7 flows, ")
    assert line.endswith("0 warnings; action names checked against examples.actions (2)")


@pytest.mark.parametrize(("args", "message"), [
    (("validate", "no/such/dir"), "omnigate: no/such/dir is not a directory"),
    (("validate", "examples/flows", "--actions", "no_such_actions"),
     "omnigate: custom actions: cannot import the custom actions package 'no_such_actions'"),
    (("validate", "examples/flows", "--actions", "not a package"),
     "omnigate: invalid settings:"),
])
def test_validate_command_usage_errors(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, lines = run_cli(capsys, *args)
    assert code == 2
    assert lines[0].startswith(message)


# --------------------------------------------------------------------- schema


def test_schema_command_prints_the_committed_schema(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _ = run_cli(capsys, "schema")
    assert code == 0
    main(["flows", "schema"])
    printed = capsys.readouterr().out
    assert printed == SCHEMA_FILE.read_text(), (
        "docs/flows.schema.json is stale: run omnigate flows schema -o docs/flows.schema.json")
    assert json.loads(printed) == json_schema()
    code, lines = run_cli(capsys, "schema", "--output", str(tmp_path / "s.json"))
    assert code == 0 and lines == [f"wrote {tmp_path / 's.json'}"]
    assert (tmp_path / "s.json").read_text() == printed


def _validator() -> Any:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", sorted(
    p.relative_to(ROOT)
    for p in [*(ROOT / EXAMPLES).glob("*.yaml"), *(ROOT / FIXTURES / "shop").glob("*.yaml")]
), ids=str)
def test_the_schema_accepts_the_example_flows(path: Path) -> None:
    data, _ = load_yaml((ROOT / path).read_text())
    assert list(_validator().iter_errors(data)) == []


def test_the_schema_rejects_a_broken_flow_file() -> None:
    validator = _validator()
    data, _ = load_yaml((ROOT / STRUCTURE / "shop.yaml").read_text())
    where = {tuple(e.absolute_path) for e in validator.iter_errors(data)}
    assert where == {
        (),  # intens
        ("slots",),  # 'Order Number'
        ("slots", "name", "ttl"),  # 3 weeks
        *(("flows", "hello", "steps", n) for n in range(8)),  # each broken step
    }
    data, _ = load_yaml((ROOT / STRUCTURE / "vocab.yaml").read_text())
    where = {tuple(e.absolute_path) for e in validator.iter_errors(data)}
    assert ("intents", "greet") in where and ("flows", "empty") in where


def test_the_schema_names_step_kinds_and_loads_with_the_modeline() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    kinds = {name for d in schema["definitions"].values()
             for name in d.get("required", [])}
    assert {"say", "ask", "set", "if", "action", "http", "handoff", "resolve", "goto"} <= kinds
    first = (ROOT / FIXTURES / "shop" / "domain.yaml").read_text().splitlines()[0]
    target = first.removeprefix("# yaml-language-server: $schema=")
    assert (ROOT / FIXTURES / "shop" / target).resolve() == SCHEMA_FILE
