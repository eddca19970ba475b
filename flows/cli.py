"""``omnigate flows validate|test|schema``: the bot designer's commands.

    omnigate flows validate [DIR]                 every problem as file:line:col: message
    omnigate flows test [DIR] [--stories PATH]    run the conversation test stories
    omnigate flows schema [--output FILE]         the JSON Schema of a flow file

DIR defaults to OMNIGATE_FLOWS_DIR (the shipped examples/flows/). Exit codes: 0 fine,
1 problems (validation errors, failing stories), 2 bad usage or settings.

Custom actions: ``validate`` checks that every ``action`` step names a registered action,
and ``test`` runs them in-process, from ``--actions PACKAGE`` or OMNIGATE_ACTIONS_PACKAGE
(or on the action server at OMNIGATE_ACTION_SERVER_URL). With none of these, the shipped
examples/flows/ use the shipped example actions (``examples.actions``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.validate import LoadResult, Problem, json_schema, load_flows

if TYPE_CHECKING:
    from flows.ports import ActionRunner
    from gateway.settings import Settings


class _Usage(Exception):
    """Bad arguments or settings: exit code 2."""


def add_commands(commands: Any) -> None:
    """Add ``flows`` and its subcommands to the ``omnigate`` parser's subparsers."""
    flows = commands.add_parser("flows", help="validate and test bot flows, print their schema")
    actions = flows.add_subparsers(dest="flows_command", required=True, metavar="ACTION")
    validate = actions.add_parser(
        "validate", help="check every flow file; print each problem as file:line:column")
    validate.add_argument("dir", nargs="?", type=Path,
                          help="the flows directory (default OMNIGATE_FLOWS_DIR)")
    test = actions.add_parser("test", help="run the conversation test stories offline")
    test.add_argument("dir", nargs="?", type=Path,
                      help="the flows directory (default OMNIGATE_FLOWS_DIR)")
    for command in (validate, test):
        command.add_argument(
            "--actions", metavar="PACKAGE",
            help="the Python package of your custom actions (default "
                 "OMNIGATE_ACTIONS_PACKAGE; for the shipped examples: examples.actions)")
    test.add_argument("--stories", type=Path,
                      help="a story file or directory (default DIR/stories)")
    test.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    schema = actions.add_parser("schema", help="print the JSON Schema of a flow file")
    schema.add_argument("--output", "-o", type=Path, help="write it to this file")


def run(args: argparse.Namespace) -> int:
    try:
        if args.flows_command == "schema":
            return _schema(args.output)
        settings = _settings(args.dir, args.actions)
        directory = args.dir or settings.flows_dir
        if args.flows_command == "validate":
            return _validate(directory, settings)
        return _test(directory, args.stories or directory / "stories", settings, args.quiet)
    except _Usage as exc:
        print(f"omnigate: {exc}", file=sys.stderr)
        return 2


def _settings(directory: Path | None, actions: str | None) -> Settings:
    from gateway.settings import SettingsError, load_settings  # noqa: PLC0415

    if directory is not None and not directory.is_dir():
        raise _Usage(f"{directory} is not a directory")
    try:
        settings = load_settings(flows_dir=directory, actions_package=actions)
    except SettingsError as exc:
        raise _Usage(str(exc)) from None
    return settings.with_default_actions()  # the examples call examples.actions


def _schema(output: Path | None) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    return 0


def warning_text(problem: Problem) -> str:
    text = f"{problem.file}:{problem.line}:{problem.column}: warning: {problem.message}"
    return f"{text} (hint: {problem.hint})" if problem.hint else text


def _print_result(result: LoadResult) -> None:
    for problem in result.errors:
        print(problem)
    for problem in result.warnings:
        print(warning_text(problem))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ------------------------------------------------------------------- actions


async def _make_runner(settings: Settings) -> ActionRunner | None:
    """The configured custom-action runner (None: none configured)."""
    try:
        from flows.actions import make_runner  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the actions bridge is not installed
        return None
    from flows.ports import ActionError  # noqa: PLC0415

    try:
        runner = make_runner(settings.actions_package, settings.action_server_url)
    except (ActionError, ValueError) as exc:
        raise _Usage(f"custom actions: {exc}") from None
    return runner


async def _registered(runner: ActionRunner | None) -> tuple[set[str] | None, str]:
    """The registered action names (None: cannot tell) and how they were found."""
    if runner is None:
        return None, "no custom actions configured: action names not checked"
    names = runner.registered()
    fetch = getattr(runner, "fetch_registered", None)
    if names is None and fetch is not None:
        names = await fetch(3.0)
        if names is None:
            return None, "the action server did not list its actions: names not checked"
        return names, f"action names checked against the action server ({len(names)})"
    if names is None:
        return None, "action names not checked"
    package = getattr(runner, "package", "the actions package")
    return names, f"action names checked against {package} ({len(names)})"


async def _close(runner: ActionRunner | None) -> None:
    close = getattr(runner, "close", None)
    if close is not None:
        await close()


# ------------------------------------------------------------------ validate


def _validate(directory: Path, settings: Settings) -> int:
    async def names() -> tuple[set[str] | None, str]:
        runner = await _make_runner(settings)
        try:
            return await _registered(runner)
        finally:
            await _close(runner)

    actions, note = asyncio.run(names())
    result = load_flows(directory, actions)
    _print_result(result)
    files = _plural(len(result.files), "file")
    warnings = _plural(len(result.warnings), "warning")
    if result.domain is None:
        print(f"{_plural(len(result.errors), 'error')}, {warnings} in {files} of {directory}")
        return 1
    domain = result.domain
    print(f"ok: {directory} ({files}): {_plural(len(domain.flows), 'flow')}, "
          f"{_plural(len(domain.intents), 'intent')}, {_plural(len(domain.slots), 'slot')}; "
          f"{warnings}; {note}")
    return 0


# ---------------------------------------------------------------------- test


def _test(directory: Path, stories_at: Path, settings: Settings, quiet: bool) -> int:
    from flows.stories import load_stories  # noqa: PLC0415

    stories, problems = load_stories(stories_at)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{_plural(len(problems), 'error')} in the stories at {stories_at}")
        return 1
    if not stories:
        print(f"no stories found at {stories_at} (write them in YAML: see "
              "docs/designers-guide.md, or pass --stories PATH)")
        return 1
    return asyncio.run(_run_stories(directory, stories, settings, quiet))


async def _run_stories(directory: Path, stories: list[Any], settings: Settings,
                       quiet: bool) -> int:
    from flows.registry import FlowLoadError, load_directory  # noqa: PLC0415
    from flows.stories import run_stories  # noqa: PLC0415

    runner = await _make_runner(settings)
    try:
        actions, _ = await _registered(runner)
        try:
            loaded = await asyncio.to_thread(load_directory, directory, actions)
        except FlowLoadError as exc:
            for problem in exc.problems:
                print(problem)
            print(f"the flows in {directory} have errors: fix them first "
                  "(omnigate flows validate)")
            return 1
        results = await run_stories(loaded, stories, runner)
    finally:
        await _close(runner)
    failed = [r for r in results if not r.passed]
    for result in results:
        if result.passed and not quiet:
            print(f"PASS {result.story.name}  ({result.seconds * 1000:.0f} ms)")
        elif not result.passed:
            print(f"FAIL {result.story.name}  ({result.story.where})")
            print(result.failure)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
