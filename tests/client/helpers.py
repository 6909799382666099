"""Helpers of the site tests that call the ClientApp as Flower does, with crafted Messages and Contexts.

The server controls the run_config and the message; the site controls only its node_config.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.deploy import SiteNode
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.helpers import flower_run_config

SITE_EPSILON = 2.0


def site_context(root: Path, node_config: dict[str, object], *, run_id: int = 7, **run: object) -> Context:
    """A ClientApp's Context: a tiny group-norm teacher at 32 px, run and cache folders under ``root``."""
    settings: dict[str, object] = {
        "teacher_name": "tiny-cnn",
        "teacher_norm": "group",
        "image_size": 32,
        "run_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        **run,
    }
    return Context(
        run_id=run_id,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config=flower_run_config(**settings),
    )


def dp_site(tmp_path: Path, **extra: object) -> dict[str, object]:
    """A deployed site with its own budget (``cxr-fl-client start --epsilon 2``)."""
    return {
        "site-name": "st-test",
        "data-format": "synthetic",
        "out-dir": str(tmp_path / "site"),
        "dp-target-epsilon": SITE_EPSILON,
        **extra,
    }


def dp_context(tmp_path: Path, node_config: dict[str, object], *, run_id: int = 7, **run: object) -> Context:
    """The Context of the privacy tests: `site_context` with batches of 32."""
    return site_context(tmp_path, node_config, run_id=run_id, **{"batch_size": 32, **run})


def ask(context: Context, message_type: str, **config: object) -> Message:
    """The ClientApp's reply to ``message_type`` carrying the run's initial teacher and ``config``."""
    server_side = {**context.run_config, "teacher-weights": ""}  # names a file at the site (item 8)
    arrays = initial_teacher(run_settings_from_config(server_side))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
    return app(Message(content, dst_node_id=1, message_type=message_type), context)


def ask_train(context: Context, server_round: int, num_rounds: int) -> Message:
    return ask(context, "train", **{"server-round": server_round, "num-rounds": num_rounds})


def replied(reply: Message) -> RecordDict:
    """The reply's content; the test fails where the site sent an error."""
    assert not reply.has_error(), reply.error.reason
    return reply.content


def policy_run_config(tmp_path: Path, **extra: object) -> dict[str, object]:
    """The run_config of the site-policy tests: a tiny teacher at 32 px."""
    settings: dict[str, object] = {"teacher_name": "tiny-cnn", "image_size": 32, **extra}
    return flower_run_config(run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **settings)


def policy_site(tmp_path: Path, **policy: object) -> dict[str, object]:
    """A deployed site's node_config with its own ``policy`` limits."""
    return {"site-name": "st-policy", "data-format": "synthetic", "out-dir": str(tmp_path / "site"), **policy}


def send(
    tmp_path: Path,
    node_config: dict[str, object],
    run_config: dict[str, object],
    message_type: str = "train",
    server_round: int = 1,
    num_rounds: int = 1,
) -> Message:
    """The ClientApp's reply to one message of ``run_config``'s initial teacher."""
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    arrays = initial_teacher(run_settings_from_config(run_config))
    config = ConfigRecord({"server-round": server_round, "num-rounds": num_rounds})
    content = RecordDict({"arrays": arrays, "config": config})
    return app(Message(content, dst_node_id=1, message_type=message_type), context)


def as_sent(text: str) -> str:
    """``text`` as a deployed site's error reply carries it (no integers by default)."""
    from client.disclosure import Disclosure

    return Disclosure().text(text)


def no_warm_runner(node: SiteNode, _notify: object) -> threading.Thread:
    """Stands in for ``SiteNode._start_runner``: no warm runner (no app import), only the secret
    file the SuperNode is started with."""
    from flower_adapter.app_runner import write_secret_file

    write_secret_file(node.secret_path)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    return thread
