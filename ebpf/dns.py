"""The node agent's DNS answering: a tool call's DNS goes to the node agent, which forwards what the call's
network allows to the cluster DNS and refuses the rest; for `explicit` domain rules it lets the call reach
exactly the addresses the answer holds, for their TTL (egress.resolved_entries), before the answer leaves.

Which call asked is known from the query's source: the egress program records (source address, source port,
protocol) → call cgroup id for every DNS packet it lets through to this address. A query no call sent (the
sandbox's runtime, or anything else that reaches the address) is refused: nothing but a tool call needs this
resolver, and a sender that cannot be attributed cannot be judged (fail closed). A call cannot pass as
another: its packet is recorded under its own cgroup id by the kernel, whatever source it writes, and the
answer it gets is judged by, and opens addresses for, that same id only.

Decisions are pure (egress.decide, egress.resolved_entries); this module does the sockets. Queries and
answers are read and written with dnslib."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dnslib import QTYPE, RCODE, DNSRecord

from agentkube.contract import ToolNetwork
from agentkube.ebpf import egress
from agentkube.ebpf.egress import ClusterNetworks, Decision, IPAddress, Record, Sender

log = logging.getLogger(__name__)
UPSTREAM_TIMEOUT = 3.0
TCP_IDLE_TIMEOUT = 5.0
MAX_TCP_CLIENTS = 64
WORKERS = 16


class DnsAnswerer:
    """Serves UDP and TCP DNS on `address`:`port` until closed."""

    def __init__(self, address: IPAddress, port: int, programs,
                 call_network: Callable[[int], tuple[ToolNetwork, str] | None],
                 cluster: Callable[[], ClusterNetworks], upstream: Callable[[], tuple[str, int] | None]):
        self.programs = programs
        self._call_network = call_network  # cgroup id -> (network, sandbox namespace), for running calls
        self._cluster = cluster
        self._upstream = upstream
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        for sock in (self.udp, self.tcp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(address), port))
            sock.settimeout(0.5)
        self.tcp.listen(64)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="dns")
        self._tcp_slots = threading.BoundedSemaphore(MAX_TCP_CLIENTS)
        self._threads = [threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True),
                         threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True)]
        for thread in self._threads:
            thread.start()

    # --- the decision, for one query ------------------------------------------------------------------
    def answer(self, data: bytes, sender: Sender) -> bytes | None:
        """The reply to one query from `sender` (None: drop it, it is not a query)."""
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return None
        if query.header.qr:
            return None  # a response: nothing asked for it
        if len(query.questions) != 1:
            return _reply(query, RCODE.FORMERR)
        qname = str(query.q.qname)
        cgroup_id = self.programs.dns_sender(sender)
        call = self._call_network(cgroup_id) if cgroup_id is not None else None
        if call is None:
            log.info("DNS query for %s from %s:%d, which is no running tool call: refused", qname, sender.address,
                     sender.port)
            return _reply(query, RCODE.REFUSED)
        network, namespace = call
        cluster = self._cluster()
        decision = egress.decide(network, qname, egress.search_suffixes(namespace, cluster.domain), cluster.domain)
        if decision in (Decision.REFUSE, Decision.NOT_FOUND):
            self.programs.count_dns_refused(cgroup_id)
        if decision is Decision.REFUSE:
            return _reply(query, RCODE.REFUSED)
        if decision is not Decision.FORWARD:
            return _reply(query, RCODE.NXDOMAIN)
        upstream = self._upstream()
        try:
            if upstream is None:
                raise OSError("no upstream DNS known yet")
            raw = _forward(data, upstream, tcp=sender.protocol == egress.PROTOCOLS["tcp"])
            reply = DNSRecord.parse(raw)
        except Exception as error:
            log.warning("forwarding %s to %s: %s", qname, upstream, error)
            return _reply(query, RCODE.SERVFAIL)
        if reply.header.id != query.header.id or [str(q.qname).lower() for q in reply.questions] != [qname.lower()]:
            return _reply(query, RCODE.SERVFAIL)
        if network.egress == "explicit":
            records = [Record(str(rr.rname), QTYPE.get(rr.rtype, str(rr.rtype)), rr.ttl, str(rr.rdata))
                       for rr in reply.rr]
            entries = egress.resolved_entries(cgroup_id, network, qname, records, cluster, time.monotonic_ns())
            self.programs.allow_resolved(entries)  # before the answer leaves: the call connects right after
        return raw

    # --- sockets --------------------------------------------------------------------------------------
    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            self._pool.submit(self._udp_one, data, peer)

    def _udp_one(self, data: bytes, peer) -> None:
        try:
            reply = self.answer(data, Sender(_ip(peer[0]), peer[1], egress.PROTOCOLS["udp"]))
            if reply is not None:
                self.udp.sendto(reply, peer)
        except Exception:
            log.exception("answering a DNS query over UDP")

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.tcp.accept()
            except (socket.timeout, OSError):
                continue
            if not self._tcp_slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._tcp_one, args=(conn, peer), name="dns-tcp-client", daemon=True).start()

    def _tcp_one(self, conn: socket.socket, peer) -> None:
        sender = Sender(_ip(peer[0]), peer[1], egress.PROTOCOLS["tcp"])
        try:
            conn.settimeout(TCP_IDLE_TIMEOUT)
            while not self._stop.is_set():
                data = _read_framed(conn)
                if data is None:
                    return
                reply = self.answer(data, sender)
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            conn.close()
            self._tcp_slots.release()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.udp.close()
        self.tcp.close()


def _ip(text: str) -> IPAddress:
    import ipaddress

    return ipaddress.ip_address(text.split("%", 1)[0])


def _reply(query: DNSRecord, rcode: int) -> bytes:
    reply = query.reply()
    reply.header.rcode = rcode
    reply.header.aa = 0
    return reply.pack()


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_framed(conn: socket.socket) -> bytes | None:
    head = _read_exactly(conn, 2)
    return None if head is None else _read_exactly(conn, struct.unpack("!H", head)[0])


def _forward(data: bytes, upstream: tuple[str, int], tcp: bool) -> bytes:
    """The upstream's answer to a query, over the protocol the call used (a truncated UDP answer goes back
    as is: the call's resolver retries over TCP, which is forwarded over TCP)."""
    family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
        sock.settimeout(UPSTREAM_TIMEOUT)
        sock.connect(upstream)
        if tcp:
            sock.sendall(struct.pack("!H", len(data)) + data)
            reply = _read_framed(sock)
            if reply is None:
                raise OSError("upstream closed the connection")
            return reply
        sock.send(data)
        return sock.recv(65535)
