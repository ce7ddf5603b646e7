"""The Grid as the strategy sees it: float32 weights in and out, 16-bit on the wire, named sites.

Wrapping Flower's Grid (rather than each strategy) keeps every strategy untouched: FedAvg,
FedProx and FedAdam average and update in float32, while this layer encodes what leaves the
server, decodes what arrives, counts the bytes per site, remembers which node is which site,
validates every update before the strategy sees it (server/validate.py: a rejected one is left
out of the round, named with its reason), and bounds the wait for sites so that a missing
hospital is named, never waited on forever.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from mrsfm_model.model.wire import decode, encode, nbytes, pack_state, to_state, unpack

from .validate import UpdateValidator, ValidationSettings

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # what configs/site/<name>.yaml can be called


def _printable(text: str, n: int = 40) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:n])


class SitesMissingError(RuntimeError):
    """Fewer than min-sites SuperNodes connected within wait-timeout-s."""


@dataclass
class SiteReply:
    node_id: int
    site: str
    ok: bool
    metrics: dict = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    error: str = ""


class WireGrid(Grid):
    """Delegates to Flower's Grid; see the module docstring for what it adds."""

    def __init__(self, grid: Grid, template: Mapping[str, torch.Tensor], wire_dtype: str, min_sites: int,
                 wait_timeout_s: float, expected_sites: Iterable[str] = (), sites: dict[int, str] | None = None,
                 logger: Callable[[str], None] | None = None,
                 validation: ValidationSettings | Mapping | None = None, *, examples_per_update: int):
        """`validation`: configs/validation (`cfg.validation`) or ValidationSettings; None: its defaults.
        `examples_per_update`: what the server asked each site for (local steps x batch size); it
        replaces the site's own `num-examples`, so no site can weigh itself up (1e12) or break the
        round (NaN) by what it claims."""
        if not examples_per_update > 0:
            raise ValueError(f"examples_per_update must be > 0, got {examples_per_update}")
        self.examples_per_update = int(examples_per_update)
        self.grid, self.template, self.wire_dtype = grid, template, wire_dtype
        self.min_sites, self.wait_timeout_s = min_sites, wait_timeout_s
        self.expected = list(expected_sites)
        self.sites: dict[int, str] = dict(sites or {})  # node id -> site name, learnt from replies
        self.say = logger or (lambda msg: log(INFO, msg))
        self.last_train: list[SiteReply] = []
        self.last_seconds: dict[str, float] = {}  # the last train exchange: send, wait, check (metrics.jsonl)
        self.validate = UpdateValidator(template, wire_dtype, validation, say=self.say)

    # -- plain delegation ------------------------------------------------------------------------
    def set_run(self, run) -> None:  # type: ignore[override]
        self.grid.set_run(run)

    @property
    def run(self):  # type: ignore[override]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def _exchange(self, messages: list[Message], timeout: float | None, poll_s: float = 0.2) -> list[Message]:
        """Flower's Grid.send_and_receive, polling for replies every `poll_s` instead of every 3 s: a
        round of warm sites takes a few seconds, and the fixed 3 s wait was most of it."""
        pending = set(self.grid.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            time.sleep(poll_s)
        return replies

    # -- weights on the wire -----------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Encode what leaves, decode and validate what arrives (train replies: a rejected update is
        left out of what the strategy aggregates), and report every site in `last_train`."""
        messages = list(messages)
        if not messages:
            return []
        is_train = messages[0].metadata.message_type.startswith(MessageType.TRAIN)
        wire, sent, globals_, out = {}, {}, {}, []
        clock = [time.monotonic()]

        def lap() -> float:
            clock.append(time.monotonic())
            return round(clock[-1] - clock[-2], 3)
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))
            node = msg.metadata.dst_node_id
            sent[node] = 0
            for key, rec in msg.content.array_records.items():
                if id(rec) not in wire:  # the strategy sends one record to all: encode and pack it once
                    packed = pack_state(to_state(rec), self.wire_dtype)
                    wire[id(rec)] = (nbytes(packed), packed)
                sent[node] += wire[id(rec)][0]
                content[key] = wire[id(rec)][1]
            globals_[node] = dict(msg.content.array_records)  # float32: what validation compares with
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type,
                               group_id=msg.metadata.group_id, ttl=msg.metadata.ttl))
        seconds = {"send": lap()}  # encode and pack
        replies = self._exchange(out, timeout)
        seconds["wait"] = lap()  # push, the sites' work and transport, pull
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in out}  # ids are set once pushed
        # an error reply comes from the SuperLink (node 1): map it back to its node
        nodes = [to_node.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]
        answered = {node: r.content for node, r in zip(nodes, replies) if not r.has_error()}
        unpackable = {}
        up = {node: sum(nbytes(r) for r in c.array_records.values()) for node, c in answered.items()}  # as sent
        for node, content in answered.items():
            self.name_site(node, content)
            try:
                for key, rec in list(content.array_records.items()):
                    content[key] = unpack(rec)
            except ValueError as exc:
                unpackable[node] = str(exc)
        answered = {node: c for node, c in answered.items() if node not in unpackable}
        if is_train:
            updates, rejected = self.validate(answered, {node: globals_.get(node, {}) for node in answered})
            rejected.update(unpackable)
        else:  # no checks on other replies (none carry weights today: evaluation is off)
            rejected = unpackable
            updates = {n: {k: decode(r, self.template) for k, r in c.array_records.items()}
                       for n, c in answered.items()}
        kept, report = [], []
        for node, reply in zip(nodes, replies):
            site, down = self.sites.get(node, f"node {node}"), sent.get(node, 0)
            if reply.has_error():
                report.append(SiteReply(node, site, False, bytes_down=down, error=reply.error.reason))
                kept.append(reply)
                continue
            content = reply.content
            metrics = {k: v for m in content.metric_records.values() for k, v in m.items()}
            if node in rejected:
                report.append(SiteReply(node, site, False, metrics, down, up[node],
                                        error=f"rejected: {rejected[node]}"))
                continue
            for key, state in updates[node].items():
                content[key] = encode(state, "fp32")
            self._server_weight(content, metrics)
            report.append(SiteReply(node, site, True, metrics, down, up[node]))
            kept.append(reply)
        for node in set(sent) - {r.node_id for r in report}:
            report.append(SiteReply(node, self.sites.get(node, f"node {node}"), False, bytes_down=sent[node],
                                    error=f"no reply within {timeout} s"))
        n_ok = sum(r.ok for r in report)
        for r in report:
            if not r.ok:
                who = f"node {r.node_id}" if r.site == f"node {r.node_id}" else f"site {r.site} (node {r.node_id})"
                what = "sent an update that was" if r.error.startswith("rejected") else "dropped out of this round:"
                rest = f"aggregating the {n_ok} other site(s)" if n_ok else "no site left to aggregate"
                log(WARNING, f"[mrsfm] {who} {what} {r.error}; {rest}")
        if is_train:
            seconds["check"] = lap()  # unpack, validate, re-encode for the strategy
            self.last_train, self.last_seconds = report, seconds
        return kept

    def _server_weight(self, content: RecordDict, metrics: dict) -> None:
        """The aggregation weight is the server's, whatever the site claimed (kept, if it differs,
        as `reported-examples` for the metrics line)."""
        record = next(iter(content.metric_records.values()))
        claimed = record.get("num-examples")
        record["num-examples"] = metrics["num-examples"] = self.examples_per_update
        if claimed != self.examples_per_update:
            metrics["reported-examples"] = claimed

    def name_site(self, node: int, content: RecordDict) -> str:
        """The name this run uses for `node`. A site names itself, but the name is the server's to
        keep: it must be a plain name (no control characters or paths reach logs and files), a node
        keeps the name it first had, and a name another connected node holds is not taken over
        (with node authentication the node id is the registered key)."""
        claim = str(content.config_records["site"]["site"]) if "site" in content.config_records else ""
        known = self.sites.get(node)
        if known is not None and not known.startswith("node "):
            if claim and claim != known:
                self.say(f"node {node} ({known}) now calls itself {_printable(claim)!r}; it stays {known}")
            return known
        name = f"node {node}"
        if not SITE_NAME.fullmatch(claim):
            if claim:
                self.say(f"node {node} sent a site name that is not a plain name ({_printable(claim)!r}); "
                         f"called {name}")
        elif (holder := self._connected_holder(claim, node)) is not None:
            name = f"node {node} (claims {claim})"
            self.say(f"node {node} claims to be {claim}, which connected node {holder} already is; called {name!r}")
        else:
            name = claim
        self.sites[node] = name
        return name

    def _connected_holder(self, name: str, node: int) -> int | None:
        """Another node that holds `name` and is connected now (the SuperLink is asked only then)."""
        others = [o for o, n in self.sites.items() if n == name and o != node]
        connected = set(self.grid.get_node_ids()) if others else set()
        return next((o for o in others if o in connected), None)

    # -- bounded wait for sites ---------------------------------------------------------------------
    def wait_for_sites(self, poll_s: float = 1.0, log_every_s: float = 10.0) -> list[int]:
        """Connected node ids once at least min-sites are online; SitesMissingError after the timeout."""
        t0 = time.monotonic()
        last_log = t0 - log_every_s / 2  # first word after a few seconds: sites still starting are normal
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= self.min_sites:
                return ids
            waited = time.monotonic() - t0
            if waited >= self.wait_timeout_s or time.monotonic() - last_log >= log_every_s:
                self.identify(ids, timeout=min(10.0, max(1.0, self.wait_timeout_s - waited)))
                line = self.describe(ids)
                if time.monotonic() - t0 >= self.wait_timeout_s:
                    raise SitesMissingError(f"gave up after {self.wait_timeout_s:g} s (wait-timeout-s): {line}")
                self.say(f"waiting for sites ({waited:.0f}/{self.wait_timeout_s:g} s): {line}")
                last_log = time.monotonic()
            time.sleep(poll_s)

    def describe(self, ids: list[int]) -> str:
        named = sorted(self.sites[i] for i in ids if i in self.sites)
        unknown = sum(i not in self.sites for i in ids)
        missing = [s for s in self.expected if s not in named]
        text = f"{len(ids)} of the {self.min_sites} required site(s) connected"
        if named or unknown:
            text += " (" + ", ".join(named + ([f"{unknown} unidentified"] if unknown else [])) + ")"
        if missing:
            text += f"; missing: {', '.join(missing)}"
        return text

    def identify(self, ids: list[int], timeout: float) -> None:
        """Ask connected nodes we cannot name yet for their site (a query message, no weights)."""
        unknown = [i for i in ids if i not in self.sites]
        if not unknown:
            return
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"ask": "site"})}), dst_node_id=i,
                        message_type=MessageType.QUERY) for i in unknown]
        for reply in self._exchange(msgs, timeout):
            if not reply.has_error():
                self.name_site(reply.metadata.src_node_id, reply.content)
