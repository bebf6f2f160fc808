"""An in-memory Flower grid: every message goes through Flower's own object serialization
(deflate and inflate, as the SuperLink does) to in-process ClientApps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents


def roundtrip(msg: Message) -> Message:
    """Serialize and rebuild a message the way it crosses the SuperLink."""
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(out, Message)
    out.metadata.__dict__["_message_id"] = msg.object_id
    return out


Tamper = Callable[[str, Message, Message], Message | None]
"""(site, message received, its reply) -> the reply to deliver, or None for no reply."""


class FakeGrid(Grid):
    """Delivers messages to in-process ClientApps; ``tamper`` can alter or drop replies."""

    def __init__(self, nodes: dict[int, tuple[Any, Context]], tamper: Tamper | None = None):
        self.nodes = nodes
        self.tamper = tamper
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.delivered: list[Message] = []  # every reply the coordinator could pull
        self.offline: set[int] = set()
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.nodes if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            received = roundtrip(msg)
            app, ctx = self.nodes[msg.metadata.dst_node_id]
            try:
                reply = app(received, ctx)
            except Exception as exc:
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                    reply_to=received,
                )
            name = ctx.node_config["site"]
            if self.tamper is not None:
                reply = self.tamper(name, received, reply)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = reply.object_id
                self.replies[msg.object_id] = roundtrip(reply)
                self.delivered.append(self.replies[msg.object_id])
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        ids = list(self.push_messages(messages))
        return self.pull_messages(ids)


