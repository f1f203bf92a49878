"""Assemble the server application from resolved config sections: base model, store, engine, scheduler."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI

from softprompt.config import ConfigError
from softprompt.config.checks import admin_token_problem
from softprompt.engine import Engine
from softprompt.server.app import ServerState, create_app
from softprompt.server.scheduler import Scheduler
from softprompt.store import PromptStore
from softprompt.workflows import load_model_from_args

log = logging.getLogger("softprompt")


def read_token_file(path: str | None) -> str | None:
    """The admin token kept in a file (first line, surrounding whitespace dropped), so no process list shows it.

    Raises:
        ConfigError: the file cannot be read or its first line is blank.
    """
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8-sig").strip().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--admin-token-file {path!r}: cannot read it ({e})") from e
    if not token or not token[0].strip():
        raise ConfigError(f"--admin-token-file {path!r} is empty")
    problem = admin_token_problem(token[0].strip(), f"the token in --admin-token-file {path!r}")
    if problem:
        raise ConfigError(problem)
    return token[0].strip()


def check_listen(host: str, port: int) -> None:
    """Refuse, before the model loads, an address the server could not listen on (a port in use, a host name
    that does not resolve or is not this machine's): uvicorn found it only after loading, exiting 3.

    Raises:
        ConfigError: naming --host/--port and the reason.
    """
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({e})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a listener still refuses
        try:
            sock.bind(addr)
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def build_app(args: dict) -> FastAPI:
    """The server application for resolved ``model`` and ``serve`` sections (used by ``serve`` and tests).

    The admin token comes from ``--admin-token``, else ``--admin-token-file``, else the
    ``SOFTPROMPT_ADMIN_TOKEN`` environment variable; without one the admin endpoints are disabled.
    """
    sv = args["serve"]
    token = sv.admin_token or read_token_file(sv.admin_token_file)
    if token is None and os.environ.get("SOFTPROMPT_ADMIN_TOKEN") is not None:
        token = os.environ["SOFTPROMPT_ADMIN_TOKEN"]
        problem = admin_token_problem(token, "SOFTPROMPT_ADMIN_TOKEN")
        if problem:
            raise ConfigError(problem + " (unset it to disable the admin endpoints)")
    store = PromptStore(sv.store) if sv.store else None
    if store is not None and sv.base_task and sv.base_task in (sv.tasks or store.names()):
        raise ConfigError(f"--base-task {sv.base_task!r}: the store {sv.store} has an entry of that name, which the "
                          f"plain base model would hide; give the base-model task another name (--base-task NAME)")
    model, tok = load_model_from_args(args)
    # serving the whole store, one broken entry is skipped (logged); a broken entry named by --tasks is an error
    limits = {"max_batch_rows": sv.max_batch_rows, "prefill_chunk": sv.prefill_chunk}
    engine = (Engine.from_store(store, model, tok, names=sv.tasks or None, skip_broken=not sv.tasks, **limits)
              if store else Engine(model, tok, **limits))
    if sv.base_task and engine.family.generates:  # a classifier with a head has nothing to serve without a prompt
        engine.add_base(sv.base_task)
    if not engine.task_names() and store is not None and token:  # to be filled through the admin API
        log.warning("serving no task yet: the store %s has no entry that loads; load some with POST "
                    "/admin/tasks/NAME/load", sv.store)
    elif not engine.task_names():  # every entry broken or skipped, an empty store, a classifier without prompts
        raise ConfigError("nothing to serve: " + (f"the store {sv.store} has no entry that loads" if store else
                                                  "no --store") +
                          ("" if engine.family.generates or not sv.base_task else
                           f" and --base-task is not served for {type(model).__name__}, a classifier (its "
                           "prompts carry their heads)"))
    scheduler = Scheduler(engine, sv.max_batch_requests, sv.max_wait_ms, sv.max_queue, policy=sv.scheduler,
                          max_queue_per_client=sv.max_queue_per_client)
    state = ServerState(engine, scheduler, store=store,
                        admin_token=token, max_tokens=sv.max_tokens, max_body_bytes=sv.max_body_bytes,
                        max_input_chars=sv.max_input_chars, client_header=sv.client_header)
    log.info("serving %d tasks: %s%s", len(engine.task_names()), ", ".join(engine.task_names()),
             "" if token else " (admin endpoints disabled: no --admin-token / SOFTPROMPT_ADMIN_TOKEN)")
    return create_app(state)
