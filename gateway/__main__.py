"""The ``omnigate`` command: ``serve``, ``agents add|list``, ``retention``, ``openapi``,
``flows validate|test|schema`` (flows/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from pymongo.errors import PyMongoError

from gateway.logs import access_log_options, configure_logging
from gateway.model import Agent, AgentRole
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import Store, StoreError

T = TypeVar("T")
log = logging.getLogger("omnigate")


def _version() -> str:
    try:
        return version("omnigate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnigate",
        description="Omnigate: an omnichannel customer-service gateway. Every setting can "
        "also come from an OMNIGATE_* environment variable (see README).",
    )
    parser.add_argument("--version", action="version", version=f"omnigate {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    store_options = argparse.ArgumentParser(add_help=False)
    store_options.add_argument(
        "--data-dir",
        type=Path,
        help="data directory for the embedded store (OMNIGATE_DATA_DIR, default ./.omnigate)",
    )
    store_options.add_argument(
        "--mongodb-uri",
        help="use this MongoDB instead of the embedded store (OMNIGATE_MONGODB_URI)",
    )

    serve = commands.add_parser(
        "serve",
        parents=[store_options],
        help="run the gateway (web chat demo at http://HOST:PORT/)",
    )
    serve.add_argument("--host", help="address to listen on (OMNIGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OMNIGATE_PORT, default 8080)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="run N gateway processes on the port, sharing the store, to use "
                       "N cores (OMNIGATE_WORKERS, default 1)")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal

    agents = commands.add_parser("agents", help="manage agents")
    agent_commands = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    add = agent_commands.add_parser(
        "add", parents=[store_options], help="create an agent and print its API token"
    )
    add.add_argument("name", nargs="?", metavar="NAME", help="display name customers see")
    add.add_argument("--name", dest="name_option", metavar="NAME", help="the same as NAME")
    add.add_argument("--email", help="the email the agent signs in to the console with")
    add.add_argument(
        "--role", choices=[r.value for r in AgentRole], default=AgentRole.AGENT.value,
        help="admin: everything; agent: conversations; designer: flows (default agent)",
    )
    add.add_argument("--team", action="append", default=[], help="a team (repeatable)")
    add.add_argument("--skill", action="append", default=[], help="a skill (repeatable)")
    add.add_argument("--capacity", type=int, default=3,
                     help="conversations at once, 0-100 (default 3)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read a console password, 10 characters or more (first line of "
                     "standard input; asked for without echo on a terminal); needs --email")
    agent_commands.add_parser("list", parents=[store_options], help="list agents")

    retention = commands.add_parser(
        "retention", parents=[store_options],
        help="delete the conversations resolved more than OMNIGATE_RETENTION_DAYS days ago "
        "(analytics keep anonymised figures)")
    retention.add_argument("--dry-run", action="store_true",
                           help="count what would be deleted; change nothing")
    commands.add_parser("openapi", help="print the agent API's OpenAPI document")
    from flows.cli import add_commands as add_flows_commands

    add_flows_commands(commands)
    return parser


async def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``work`` against the configured store (the embedded one, started if needed)."""
    from gateway.store.access import ensure_indexes as ensure_access_indexes
    from gateway.store.embedded import EmbeddedStore

    embedded = None
    uri = settings.mongodb_uri
    if uri is None:
        embedded = EmbeddedStore(settings.data_dir, sync_on_commit=settings.embedded_sync_on_commit)
        uri = await embedded.start()
    store = Store.connect(uri, settings.mongodb_db)
    try:
        await store.ensure_indexes()
        await ensure_access_indexes(store)
        return await work(store)
    finally:
        await store.close()
        if embedded is not None:
            await embedded.stop()


def _split(values: list[str]) -> list[str]:
    """``--skill a --skill b,c`` -> ``[a, b, c]``."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _read_password() -> str:
    """The first line of standard input; on a terminal, asked for without echo."""
    if sys.stdin.isatty():
        from gateway.desk.auth import MIN_PASSWORD

        return getpass.getpass(f"Console password ({MIN_PASSWORD} characters or more): ")
    return sys.stdin.readline().rstrip("\r\n")


def _agents(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.desk.agents import Agents
    from gateway.desk.auth import check_password_rules

    if args.agents_command == "add":
        name = args.name or args.name_option
        if not name or (args.name and args.name_option and args.name != args.name_option):
            raise ValueError("give the agent's name once: omnigate agents add NAME")
        if not 0 <= args.capacity <= 100:
            raise ValueError("--capacity is 0 to 100 conversations")
        password = _read_password() if args.password_stdin else None
        if password is not None:
            check_password_rules(password)  # before the store starts, not after

        async def add(store: Store) -> tuple[Agent, str, list[Agent]]:
            agents = Agents(store)
            namesakes = [a for a in await agents.list()
                         if a.active and a.name.casefold() == name.strip().casefold()]
            agent, token = await agents.add(
                name, args.email, role=AgentRole(args.role), teams=_split(args.team),
                skills=_split(args.skill), capacity=args.capacity, password=password,
            )
            return agent, token, namesakes

        agent, token, namesakes = asyncio.run(_with_store(settings, add))
        print(f"agent {agent.name} created (id {agent.id}, role {agent.role.value}).")
        print("API token (shown once; keep it secret):")
        print(token)
        for other in namesakes:  # allowed, as in Zendesk or Chatwoot: the email is the key
            print(f"omnigate: note: another agent is named {other.name} too (id {other.id}, "
                  f"{other.email or 'no email'}): customers and colleagues will see two. "
                  "Change or deactivate one with PATCH /api/v1/agents/ID "
                  "(see /api/docs)", file=sys.stderr)
        return 0
    agents = asyncio.run(_with_store(settings, lambda store: Agents(store).list()))
    for agent in agents:
        print(f"{agent.id}  {agent.name}  {agent.email or ''}  {agent.role.value}"
              f"{'' if agent.active else '  (inactive)'}")
    if not agents:
        print("no agents yet: omnigate agents add 'Your Name' --role admin")
    return 0


def _retention(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.retention import Retention
    from gateway.store.audit import Actor

    days = settings.retention_days
    if days is None:
        print("omnigate: set OMNIGATE_RETENTION_DAYS to the number of days resolved "
              "conversations are kept", file=sys.stderr)
        return 2
    who = Actor(id=None, name="omnigate retention")
    report = asyncio.run(_with_store(settings, lambda store: Retention(store, days).run(
        dry_run=args.dry_run, who=who)))
    print("\n".join(report.lines()))
    return 0


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """The listening address taken before anything starts, as asyncio's ``create_server``
    would take it (every address ``host`` resolves to; IPv6 sockets IPv6 only): a port in
    use fails here, with a message for people, before the store or a channel starts."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror} "
                      "(OMNIGATE_HOST or --host)") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                hint = (" (another program, or another Omnigate, listens there: choose "
                        "another port with --port or OMNIGATE_PORT)"
                        if exc.errno == errno.EADDRINUSE else "")
                raise OSError(f"cannot listen on {host}:{port}: "
                              f"{(exc.strerror or str(exc)).lower()}{hint}") from exc
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _serve(settings: Settings, *, worker: bool = False) -> int:
    from gateway.app import build_bot, create_app

    master = settings.workers > 1 and not worker
    # Bound first: a port in use stops here, before the log promises a page there. The
    # master only checks (its workers bind the port themselves, with SO_REUSEPORT).
    sockets = bind(settings.host, settings.port, reuse_port=worker or master)
    port = sockets[0].getsockname()[1]  # --port 0: the one the system chose
    if not worker:
        store = (settings.mongodb_uri and "MongoDB at OMNIGATE_MONGODB_URI") or (
            f"embedded store in {settings.data_dir.resolve()}"
        )
        log.info(
            "Omnigate %s: demo page http://%s:%d/  agent API http://%s:%d/api/docs  (%s)",
            _version(), settings.host, port, settings.host, port, store,
        )
    if master:
        for sock in sockets:
            sock.close()
        from gateway.workers import serve_workers

        build_bot(settings)  # bad flows fail here, once, not in every worker
        return serve_workers(settings)  # the master: N of the below, one store
    app = create_app(settings)

    async def stopping(app: web.Application) -> None:
        log.info("stopping: closing connections, then the channels and the store")

    app.on_shutdown.append(stopping)
    web.run_app(
        app,
        sock=sockets,
        print=None,
        **access_log_options(settings),
        shutdown_timeout=10.0,
    )
    log.info("Omnigate stopped" if not worker else "worker stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; a reader that stops early (``omnigate openapi | head``) ends it
    quietly, as a closed pipe ends ``cat``: no traceback, exit code 141 (128 + SIGPIPE)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that is silent too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "flows":  # the designer's tools: no store, no server
        from flows.cli import run as run_flows

        return run_flows(args)
    try:
        settings = load_settings(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            workers=getattr(args, "workers", None),
            data_dir=getattr(args, "data_dir", None),
            mongodb_uri=getattr(args, "mongodb_uri", None),
        )
    except SettingsError as exc:
        print(f"omnigate: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        if args.command == "serve":
            return _serve(settings, worker=args.worker)
        if args.command == "agents":
            return _agents(args, settings)
        if args.command == "retention":
            return _retention(args, settings)
        from gateway.desk.api import SPEC, DeskApi

        print(json.dumps(DeskApi().app()[SPEC], indent=2))
        return 0
    except BrokenPipeError:
        raise  # an OSError, but not a failure of the command: see main()
    except (StoreError, OSError, ValueError) as exc:  # FlowLoadError is a ValueError
        print(f"omnigate: {exc}", file=sys.stderr)
        return 1
    except PyMongoError as exc:
        print(f"omnigate: the store failed or is unreachable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
