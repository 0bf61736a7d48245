"""A delay line for packets on a network namespace's way out: delay with jitter, where the
kernel has no ``netem``.

The kernel queues each outgoing UDP packet to user space (``iptables -j NFQUEUE``: this
kernel has the NFQUEUE target through nftables' xtables compatibility, not nftables' own
``queue`` statement) and holds it until it is given a verdict. This process reads each
packet's id over netfilter's netlink socket (the protocol spoken here directly: no C
library to build) and accepts it ``delay`` +- ``jitter`` later, in order (a path that
jitters does not reorder: each packet leaves no earlier than the one before). Only the
packet ids travel to user space, never their data.

Run inside the namespace whose output it delays (the netlink socket belongs to the
namespace it is opened in)::

    ip netns exec NS python -m avatar_stream.bench.delayline --queue 7 --delay 40 --jitter 15

It prints ``ready`` once bound, and runs until killed.
"""

from __future__ import annotations

import argparse
import random
import select
import socket
import struct
import sys
import time
from collections import deque

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
QUEUE_MAXLEN = 8192  # packets held at once (the kernel drops beyond: a full router buffer)


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: list[bytes], flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0,
                       0) + body


class NetfilterQueue:
    """One bound NFQUEUE: packet ids in, verdicts out."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._configure(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))

    def _configure(self, attr: bytes) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, [attr], NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(4096)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", reply, 16)
            if errno:
                raise OSError(-errno, f"NFQUEUE {self.queue} configuration refused")

    def packet_ids(self) -> list[int]:
        """The ids of the packets queued in one read (non-blocking after ``select``)."""
        data = self.sock.recv(1 << 16)
        ids, off = [], 0
        while off + 16 <= len(data):
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + 20
                while a + 4 <= off + length:
                    alen, akind = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if akind & 0x7FFF == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from("!I", data, a + 4)[0])
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3
        return ids

    def accept(self, packet_id: int) -> None:
        hdr = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue, [hdr]))


def run(queue: int, delay_s: float, jitter_s: float, seed: int | None = None) -> None:
    """Accept each packet ``delay_s`` + uniform(-``jitter_s``, +``jitter_s``) after it was
    queued, never before the one queued before it."""
    rng = random.Random(seed)
    nfq = NetfilterQueue(queue)
    held: deque[tuple[float, int]] = deque()
    last = 0.0
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            nfq.accept(held.popleft()[1])
        timeout = max(0.0, held[0][0] - now) if held else 1.0
        readable, _, _ = select.select([nfq.sock], [], [], timeout)
        if readable:
            now = time.monotonic()
            for packet_id in nfq.packet_ids():
                due = now + max(0.0, delay_s + rng.uniform(-jitter_s, jitter_s))
                last = max(last, due)
                held.append((last, packet_id))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number to serve")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, ms")
    p.add_argument("--jitter", type=float, default=0.0, help="+- this much, ms (uniform)")
    p.add_argument("--seed", type=int, help="random seed (reproducible jitter)")
    args = p.parse_args(argv)
    try:
        run(args.queue, args.delay / 1000, args.jitter / 1000, args.seed)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"delayline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
