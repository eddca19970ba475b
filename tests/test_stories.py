"""Conversation test stories (flows/stories.py, ``omnigate flows test``): passing stories on
the shop fixture and the shipped examples (with their custom actions, in-process), failing
stories with their readable diff, and story files with format errors at file:line:column.
Stories run offline: no store, no network."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flows.actions import InProcessActions
from flows.registry import load_directory
from flows.stories import StoryResult, load_stories, run_stories
from gateway.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path("tests/fixtures/flows")
SHOP = FIXTURES / "shop"
FAILING = FIXTURES / "failing_stories" / "failing.yaml"
EXAMPLES = Path("examples/flows")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for name in ("OMNIGATE_FLOWS_DIR", "OMNIGATE_ACTIONS_PACKAGE", "OMNIGATE_ACTION_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any network connection attempt is recorded and refused."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("stories run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def run(directory: Path, stories_at: Path, actions: Any = None) -> list[StoryResult]:
    stories, problems = load_stories(stories_at)
    assert problems == []
    names = actions.registered() if actions is not None else None
    loaded = load_directory(directory, names)
    return asyncio.run(run_stories(loaded, stories, actions))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["flows", "test", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines() + out.err.splitlines()


# -------------------------------------------------------------------- passing


def test_the_shop_stories_pass_offline(offline: list[Any]) -> None:
    results = run(SHOP, SHOP / "stories")
    assert [(r.story.name, r.passed, r.failure) for r in results] == [
        (r.story.name, True, None) for r in results]
    assert len(results) == 8
    assert offline == []
    first = results[0].story
    assert (first.file, first.line) == (SHOP / "stories" / "shop.yaml", 3)
    assert first.steps[0].kind == "user" and first.steps[0].line == 5


def test_the_example_stories_pass_with_the_example_actions_in_process(
    offline: list[Any],
) -> None:
    actions = InProcessActions("examples.actions")
    results = run(EXAMPLES, EXAMPLES / "stories", actions)
    failures = [r.failure for r in results if not r.passed]
    assert failures == []
    files = {r.story.file.name for r in results}
    assert files == {"faq.yaml", "handoff.yaml", "orders.yaml", "returns.yaml"}
    assert len(results) >= 15
    assert offline == []


def test_without_the_actions_the_order_story_fails_politely() -> None:
    """The flows load without an actions runner (names unchecked); the action step then
    fails, the customer gets the polite message, and the story says so."""
    results = run(EXAMPLES, EXAMPLES / "stories" / "orders.yaml")
    shipped = results[0]
    assert shipped.story.name == "a shipped order" and not shipped.passed
    assert shipped.failure is not None
    assert "got:\n    \"Sorry, I couldn't complete that just now.\"" in shipped.failure


# -------------------------------------------------------------------- failing


def _story_failures() -> dict[str, str]:
    results = run(SHOP, FAILING)
    assert not any(r.passed for r in results)
    return {r.story.name: r.failure or "" for r in results}


def _at(line: int) -> str:
    return f"{FAILING}:{line}"


EXPECTED_FAILURES = {
    "the bot says something else": f"""\
        story 'the bot says something else' failed at step 2 (bot) at {_at(6)}:
          expected the bot to say:
            "What's your order number?"
          got:
            "What's your order number? (5 digits)"
          the conversation until then:
            user: where is my order""",
    "the bot says more than expected": f"""\
        story 'the bot says more than expected' failed at step 3 (user) at {_at(12)}:
          the bot said more than the story expects (before the customer writes again):
            What can I help you with?  [Where is my order? | Return an item | Opening hours]
          the conversation until then:
            user: hello
            bot:  Hi! I'm the shop's bot.""",
    "a handoff that does not happen": f"""\
        story 'a handoff that does not happen' failed at step 3 (handoff) at {_at(18)}:
          expected a handoff to a human, got none
          the conversation until then:
            user: opening hours
            bot:  We're open Monday to Friday, 9:00-18:00.  \
[Where is my order? | Return an item | Opening hours]""",
    "a slot with another value": f"""\
        story 'a slot with another value' failed at step 5 (slots) at {_at(26)}:
          slots differ:
            name: expected 'Ada', got 'Grace'
          the conversation until then:
            user: return an item
            bot:  What's your name?
            user: Grace
            bot:  Why do you return it, Grace?  [Damaged | Wrong size | Changed my mind]""",
    "a button that is not shown": f"""\
        story 'a button that is not shown' failed at step 3 (button) at {_at(32)}:
          the customer presses 'Damaged', but no such button is shown (shown: none)
          the conversation until then:
            user: return an item
            bot:  What's your name?""",
    "an unexpected handoff": f"""\
        story 'an unexpected handoff' failed at the end of the story ({_at(34)}):
          the bot handed off, which the story does not expect (at the end of the story): \
reason 'customer asked for a human', skill None, priority 'normal'
          the conversation until then:
            user: talk to a human
            bot:  Bringing in a human.""",
    "other buttons": f"""\
        story 'other buttons' failed at step 5 (buttons) at {_at(45)}:
          expected the buttons:
            ['Damaged', 'Too small']
          got:
            ['Damaged', 'Wrong size', 'Changed my mind']
          the conversation until then:
            user: return an item
            bot:  What's your name?
            user: Ada
            bot:  Why do you return it, Ada?  [Damaged | Wrong size | Changed my mind]""",
    "a handoff with another reason": f"""\
        story 'a handoff with another reason' failed at step 3 (handoff) at {_at(51)}:
          the handoff differs:
            reason: expected 'wants a refund', got 'customer asked for a human'
            priority: expected 'high', got 'normal'
          the conversation until then:
            user: talk to a human
            bot:  Bringing in a human.""",
    "the bot says less than expected": f"""\
        story 'the bot says less than expected' failed at step 3 (bot) at {_at(57)}:
          expected the bot to say:
            'Anything else?'
          got: nothing more
          the conversation until then:
            user: opening hours
            bot:  We're open Monday to Friday, 9:00-18:00.  \
[Where is my order? | Return an item | Opening hours]""",
    "a resolve that does not happen": f"""\
        story 'a resolve that does not happen' failed at step 3 (resolved) at {_at(63)}:
          expected the bot to resolve the conversation; it did not
          the conversation until then:
            user: return an item
            bot:  What's your name?""",
    "the customer writes after the handoff": f"""\
        story 'the customer writes after the handoff' failed at step 4 (user) at {_at(70)}:
          the customer writes after the handoff, but a human owns the conversation now: \
the bot would not answer
          the conversation until then:
            user: talk to a human
            bot:  Bringing in a human.
            (handoff: customer asked for a human)""",
}


@pytest.mark.parametrize("name", list(EXPECTED_FAILURES))
def test_a_failing_story_gives_a_readable_diff(name: str) -> None:
    failures = _story_failures()
    assert list(failures) == list(EXPECTED_FAILURES)
    assert failures[name] == textwrap.dedent(EXPECTED_FAILURES[name])


def test_failing_stories_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = cli(capsys, str(SHOP), "--stories", str(FAILING))
    assert code == 1
    assert lines[-1] == f"0 passed, {len(EXPECTED_FAILURES)} failed"
    assert lines[0] == f"FAIL the bot says something else  ({FAILING}:3)"
    assert lines[1] == ("story 'the bot says something else' failed at step 2 (bot) at "
                        f"{FAILING}:6:")
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert len(fails) == len(EXPECTED_FAILURES)


def test_passing_stories_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = cli(capsys, str(SHOP))  # the stories default to DIR/stories
    assert code == 0
    assert lines[-1] == "8 passed, 0 failed"
    assert lines[0].startswith("PASS a greeting gets the menu, whose buttons start flows  (")
    code, lines = cli(capsys, str(SHOP), "-q")
    assert code == 0 and lines == ["8 passed, 0 failed"]


def test_the_shipped_examples_pass_with_their_actions_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``omnigate flows test`` with no setting: the shipped flows, their stories, and the
    shipped example actions run in-process."""
    code, lines = cli(capsys, "-q")
    assert code == 0, "\n".join(lines)
    [summary] = lines
    assert summary.endswith(" passed, 0 failed")


def test_the_examples_as_a_subprocess_from_another_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "flows", "test", str(ROOT / EXAMPLES), "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(" passed, 0 failed")


def test_a_copy_of_the_examples_takes_its_actions_from_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    for path in [*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("stories/*.yaml")]:
        target = tmp_path / path.relative_to(EXAMPLES)
        target.parent.mkdir(exist_ok=True)
        target.write_text(path.read_text())
    code, lines = cli(capsys, str(tmp_path), "-q")
    assert code == 1  # no actions configured for a copy: the action steps fail
    assert any("Sorry, I couldn't complete that just now." in line for line in lines)
    code, lines = cli(capsys, str(tmp_path), "-q", "--actions", "examples.actions")
    assert code == 0 and lines[-1].endswith(" passed, 0 failed")


# -------------------------------------------------------------- format errors


def test_story_format_errors_have_file_line_and_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        stories:
          - name: typo in a step
            steps:
              - user: hi
              - bto: Hello
              - bot: "/unclosed (/"
              - buttons: Yes
              - handoff: {desk: sales}
          - name: no steps
            steps: []
          - steps: [{user: hi}]
            contact: {email: x}
            tags: [a]
        storys: []
        """))
    (tmp_path / "syntax.yaml").write_text('stories:\n  - name: "unclosed\n')
    code, lines = cli(capsys, str(SHOP), "--stories", str(tmp_path))
    assert code == 1
    assert [line.removeprefix(f"{tmp_path}/") for line in lines] == [
        "bad.yaml:5:9: unknown story step 'bto' (hint: did you mean button?)",
        "bad.yaml:6:14: bad regular expression '/unclosed (/': missing ), unterminated "
        "subpattern at position 9 (hint: /.../ is a Python regular expression, searched in "
        "the reply)",
        "bad.yaml:7:18: 'buttons' takes a list of button titles (hint: buttons: [Yes, No])",
        "bad.yaml:8:18: 'handoff' takes true or {reason, skill, team, priority}",
        "bad.yaml:9:5: story 'no steps' has no steps (hint: steps: [{user: hi}, {bot: Hello}])",
        "bad.yaml:11:5: a story needs a name (hint: name: what the story shows)",
        "bad.yaml:12:14: contact is {name: ..., profile: {key: value}}",
        "bad.yaml:13:5: unknown field 'tags' in a story "
        "(hint: a story has name, contact and steps)",
        "bad.yaml:14:1: unknown field 'storys' in a story file (hint: did you mean stories?)",
        "syntax.yaml:2:11: YAML: found unexpected end of stream "
        "(while scanning a quoted scalar at line 2)",
        f"10 errors in the stories at {tmp_path}",
    ]


def test_a_file_without_stories_and_a_missing_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    (tmp_path / "x.yaml").write_text("stories: 5\n")
    code, lines = cli(capsys, str(SHOP), "--stories", str(tmp_path / "x.yaml"))
    assert code == 1
    assert lines[0] == (f"{tmp_path}/x.yaml:1:1: a story file has a 'stories:' list "
                        "(hint: stories: [{name: ..., steps: [...]}])")
    code, lines = cli(capsys, str(SHOP), "--stories", str(tmp_path / "none"))
    assert code == 1
    assert lines == [f"no stories found at {tmp_path / 'none'} (write them in YAML: see "
                     "docs/designers-guide.md, or pass --stories PATH)"]


def test_flows_with_errors_are_not_tested(capsys: pytest.CaptureFixture[str]) -> None:
    structure = FIXTURES / "broken" / "structure"
    code, lines = cli(capsys, str(structure), "--stories", str(SHOP / "stories"))
    assert code == 1
    assert lines[0].startswith(f"{structure}/shop.yaml:2:1: unknown field 'intens'")
    assert lines[-1] == (f"the flows in {structure} have errors: fix them first "
                         "(omnigate flows validate)")
