"""Peers behind NAT find out by themselves and train as clients.

On loopback: the probe's rules, a peer that is reachable, one whose announced address is dead, a
mode chosen by hand (never probed), the bootstrap peer as prober. In network namespaces
(``p2p_trainer.testing.netns.NatLab``: a public namespace and homes behind NAT routers that
MASQUERADE and drop every new inbound connection): a home with a forwarded port stays a full peer and
one without switches; then a public full trainer and two home trainers, none started with
``--client-mode``, train: both homes switch to client mode by themselves and contribute to every
round. The namespace tests need root and iptables and are skipped, with the reason, without them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest
from hivemind.p2p import P2P, PeerID

from p2p_trainer.metrics import read_metrics
from p2p_trainer.swarm import dialback, reachability, wire
from p2p_trainer.swarm.messages import ProbeRefusal, ProbeReply
from p2p_trainer.swarm.node import SwarmNode
from p2p_trainer.swarm.observer import Observer
from p2p_trainer.swarm.procs import command_line, descendants
from p2p_trainer.testing.netns import NatLab, why_unavailable
from p2p_trainer.testing.swarm import local_config
from tests.e2e import cli, start, stop, wait_for_line
from tests.volunteers import ROUND_ARGS, TINY_MODEL, free_port, peer_id_of, stop_all, wait_until

SWITCH = "this peer is not reachable from the swarm ("


# ---- the probe's rules ----
def test_observed_host_is_the_connection_ip_and_none_through_a_relay():
    assert reachability.observed_host("/ip4/10.77.0.10/tcp/40123") == "10.77.0.10"
    assert reachability.observed_host("/ip6/::1/tcp/5") == "::1"
    assert reachability.observed_host("/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit") is None
    assert reachability.observed_host("/dns4/example.org/tcp/1") is None


def test_the_prober_dials_only_the_host_it_sees_and_few_ports():
    announced = [
        "/ip4/192.168.10.2/tcp/4001",  # the home address: not what the prober sees
        "/ip4/10.77.0.10/tcp/4001",
        "/ip4/10.77.0.10/tcp/4001",  # duplicate
        "/ip4/10.77.0.10/udp/4001/quic",  # QUIC draft-29, which p2pd no longer speaks
        "/ip4/10.77.0.10/udp/4002/quic-v1/webtransport",  # not plain QUIC
        "/ip4/10.77.0.10/udp/4001/quic-v1",
        "/ip4/10.77.0.10/tcp/0",
        "/ip4/10.77.0.10/tcp/70000",
        "/ip4/6.6.6.6/tcp/22",  # a third party: never dialed
        "/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit",
        *[f"/ip4/10.77.0.10/tcp/{5000 + i}" for i in range(10)],
    ]
    targets = reachability.dial_targets(announced, "10.77.0.10")
    Target = reachability.Target
    assert targets[:2] == [Target("10.77.0.10", 4001), Target("10.77.0.10", 4001, quic=True)]
    assert len(targets) == reachability.MAX_DIALS and {t.host for t in targets} == {"10.77.0.10"}
    assert [t.port for t in targets[2:]] == [5000, 5001]
    assert reachability.dial_targets(["/ip4/192.168.10.2/tcp/4001"], "10.77.0.10") == []
    assert reachability.dial_targets(["/ip4/192.168.10.2/udp/4001/quic-v1"], "10.77.0.10") == []


def test_a_quic_probe_is_answered_only_by_a_version_negotiation_that_echoes_it():
    dcid, scid = b"d" * 8, b"s" * 8
    probe = dialback.quic_probe(dcid, scid)
    assert len(probe) == dialback.QUIC_PROBE_BYTES and probe[0] & 0xC0 == 0xC0
    answer = bytes([0x80]) + bytes(4) + bytes([8]) + scid + bytes([8]) + dcid
    assert dialback.quic_versions(answer + (1).to_bytes(4, "big"), dcid, scid) == [1]
    assert dialback.quic_versions(answer + (1).to_bytes(4, "big")[:3], dcid, scid) is None  # torn
    assert dialback.quic_versions(answer.replace(scid, dcid, 1) + bytes(4), dcid, scid) is None
    assert dialback.quic_versions(probe, dcid, scid) is None  # an echo is no answer


@pytest.mark.timeout(30)
def test_a_dial_back_needs_a_libp2p_greeting():
    async def main() -> tuple[str, str, str]:
        async def greet(reader, writer):
            writer.write(dialback.MULTISTREAM_HEADER)
            await writer.drain()
            writer.close()

        async def other(reader, writer):
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await writer.drain()
            writer.close()

        libp2p = await asyncio.start_server(greet, "127.0.0.1", 0)
        ssh = await asyncio.start_server(other, "127.0.0.1", 0)
        dead = free_port()
        try:
            return (
                await dialback.dial_libp2p("127.0.0.1", libp2p.sockets[0].getsockname()[1]),
                await dialback.dial_libp2p("127.0.0.1", ssh.sockets[0].getsockname()[1]),
                await dialback.dial_libp2p("127.0.0.1", dead),
            )
        finally:
            libp2p.close()
            ssh.close()

    ok, not_libp2p, refused = asyncio.run(main())
    assert ok == ""
    assert "other than a libp2p peer" in not_libp2p
    assert refused and "refused" in refused.lower()


@pytest.mark.timeout(60)
def test_a_quic_dial_back_needs_a_quic_v1_endpoint():
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    async def main() -> tuple[str, str, str, str]:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/udp/0/quic-v1"])
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        try:
            quic = [str(m) for m in await p2p.get_visible_maddrs() if "/quic-v1" in str(m)]
            return (
                await dialback.dial_quic("127.0.0.1", int(quic[0].split("/")[4])),
                await dialback.dial_quic("127.0.0.1", echo.get_extra_info("sockname")[1]),
                await dialback.dial_quic("127.0.0.1", silent.get_extra_info("sockname")[1], timeout=1.0),
                await dialback.dial_quic("127.0.0.1", free_port()),
            )
        finally:
            echo.close()
            silent.close()
            await p2p.shutdown()

    ok, echo, silent, refused = asyncio.run(main())
    assert ok == ""
    assert "other than a QUIC peer" in echo
    assert silent == "no answer within 1s"
    assert refused and "refused" in refused.lower()


# ---- real nodes on loopback ----
@pytest.fixture(scope="module")
def public_node():
    node = SwarmNode(local_config("nat-loopback"))
    try:
        yield node
    finally:
        node.shutdown()


def _maddr(node: SwarmNode) -> str:
    return node.call(node.visible_maddrs(), timeout=10)[0]


@pytest.mark.timeout(60)
def test_a_reachable_peer_stays_full_and_the_check_is_quick(public_node):
    assert public_node.reachability is None, "the first peer of a swarm has nobody to ask"
    before = public_node.probe_server.answered
    node = SwarmNode(local_config("nat-loopback", [_maddr(public_node)]))
    try:
        assert node.reachability is not None and node.reachability.reachable is True, node.reachability
        assert node.reachability.prober == public_node.peer_id
        assert not node.client_mode and node.probe_server is not None
        assert public_node.probe_server.answered == before + 1
        started = time.monotonic()
        again = node.call(reachability.check(node.p2p, [public_node.peer_id]), timeout=10)
        took = time.monotonic() - started
        assert again.reachable is True and took < 1.0, f"a loopback probe took {took:.2f}s"
    finally:
        node.shutdown()


@pytest.mark.timeout(60)
def test_a_peer_listening_on_quic_only_is_dialed_back_over_quic_and_stays_full(public_node):
    quic = ["/ip4/127.0.0.1/udp/0/quic-v1"]
    node = SwarmNode(local_config("nat-loopback", [_maddr(public_node)], host_maddrs=quic))
    try:
        assert node.reachability is not None and node.reachability.reachable is True, node.reachability
        assert node.reachability.reason.endswith("(QUIC)"), node.reachability
        assert not node.client_mode
        # a peer listening on TCP only joins through it (dialing QUIC) and is probed by it
        later = SwarmNode(local_config("nat-loopback", [_maddr(node)]))
        try:
            assert "/quic-v1/" in _maddr(node)
            assert later.reachability is not None and later.reachability.prober == node.peer_id
            assert later.reachability.reachable is True and not later.client_mode, later.reachability
        finally:
            later.shutdown()
    finally:
        node.shutdown()


@pytest.mark.timeout(90)
def test_a_peer_that_cannot_be_dialed_switches_to_client_mode_in_one_line(public_node, caplog):
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}"  # announced, but nothing listens there
    cfg = local_config("nat-loopback", [_maddr(public_node)], announce_maddrs=[dead])
    with caplog.at_level(logging.INFO, logger="p2p_trainer.swarm.node"):
        with Observer(cfg) as peer:
            assert peer.cfg.client_mode, "the mode in effect is client mode"
            peer.swarm_records()  # the restarted node still reads the DHT
    switches = [r.getMessage() for r in caplog.records if r.getMessage().startswith(SWITCH)]
    assert len(switches) == 1, caplog.text
    assert "dialing it back failed" in switches[0] and "refused" in switches[0].lower()
    assert "--client-mode" in switches[0] and "--swarm.auto_client_mode false" in switches[0]


async def _raw_probe(p2p, prober: str, raw: bytes):
    """Send ``raw`` as a probe request, as a hostile asker would; the prober's answer."""
    traffic = wire.Traffic()
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(prober), reachability.HANDLER)
    try:
        await wire.send_frame(writer, raw, traffic)
        return await wire.recv_message(reader, (ProbeReply, ProbeRefusal), traffic)
    finally:
        await wire.close(writer)


@pytest.mark.timeout(60)
def test_the_prober_never_dials_a_third_party_and_refuses_malformed_requests(public_node):
    node = SwarmNode(local_config("nat-loopback", [_maddr(public_node)], auto_client_mode=False))
    try:
        ask = lambda maddrs: node.call(reachability._ask(node.p2p, public_node.peer_id, maddrs), timeout=10)
        third_party = ask(["/ip4/6.6.6.6/tcp/22", "/ip4/192.168.1.1/tcp/80"])
        assert third_party.reachable is False and third_party.observed == "127.0.0.1"
        assert "connects from 127.0.0.1 but announces no TCP or QUIC address there" in third_party.reason
        malformed = node.call(
            _raw_probe(node.p2p, public_node.peer_id, b'{"maddrs": "not a list"}'), timeout=10
        )
        assert isinstance(malformed, ProbeRefusal) and "malformed probe request" in malformed.error
    finally:
        node.shutdown()


@pytest.mark.timeout(60)
def test_a_mode_chosen_by_hand_is_never_probed(public_node):
    before = public_node.probe_server.answered
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}"
    by_hand = [
        local_config("nat-loopback", [_maddr(public_node)], client_mode=True),
        local_config("nat-loopback", [_maddr(public_node)], auto_client_mode=False, announce_maddrs=[dead]),
    ]
    for cfg in by_hand:
        node = SwarmNode(cfg)
        try:
            assert node.reachability is None
            assert node.client_mode is cfg.client_mode
        finally:
            node.shutdown()
    assert public_node.probe_server.answered == before


@pytest.mark.timeout(90)
def test_the_bootstrap_peer_answers_probes(tmp_path):
    log = tmp_path / "bootstrap.log"
    proc = start(cli("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"), log)
    try:
        maddr = wait_for_line(log, "initial peer:", proc)
        node = SwarmNode(local_config("nat-bootstrap", [maddr]))
        try:
            assert node.reachability is not None and node.reachability.reachable is True, node.reachability
            assert node.reachability.prober == maddr.rsplit("/", 1)[1]
        finally:
            node.shutdown()
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]


# ---- behind NAT, in network namespaces ----
def _lab_or_skip() -> None:
    why = why_unavailable(need_iptables=True)
    if why:
        pytest.skip(f"cannot build the NAT test's network namespaces: {why}")


# run in a home namespace: start a node the way a trainer does, print its verdict and mode
_NODE_SCRIPT = """
import json, sys
from p2p_trainer.swarm.node import SwarmNode
from p2p_trainer.testing.swarm import local_config
cfg = local_config("nat-ns", [sys.argv[1]], host_maddrs=[sys.argv[2]], announce_maddrs=sys.argv[3:])
node = SwarmNode(cfg)
print(json.dumps({"reachable": node.reachability.reachable, "reason": node.reachability.reason,
                  "client_mode": node.client_mode}), flush=True)
node.shutdown()
"""


@pytest.mark.timeout(150)
def test_behind_nat_a_forwarded_port_keeps_a_full_peer_and_the_bootstrap_peer_probes(tmp_path):
    _lab_or_skip()
    with NatLab(homes=2) as lab:
        forwarded, closed = lab.homes
        lab.forward_port(forwarded, 4001)
        lab.forward_port(forwarded, 4002, "udp")
        log = tmp_path / "bootstrap.log"
        hosts = [f"/ip4/{lab.public_addr}/tcp/4001", f"/ip4/{lab.public_addr}/udp/4001/quic-v1"]
        boot = start(lab.prefix(lab.public) + cli("bootstrap", "--host-maddrs", *hosts), log)
        try:
            wait_for_line(log, "initial peer:", boot)

            def initial_peers() -> dict[str, str]:  # its address over each transport, once both are out
                lines = [ln.split(":", 1)[1].strip() for ln in log.read_text().splitlines()
                         if ln.startswith("initial peer:")]
                found = {"quic" if "/quic-v1/" in ln else "tcp": ln for ln in lines}
                return found if len(found) == 2 else {}

            over = wait_until(initial_peers, 10, "the bootstrap peer's TCP and QUIC addresses")
            # (initial peer, listen, announce): a forwarded TCP port, a forwarded UDP port (QUIC);
            # a home announcing nothing the prober sees, and one announcing its router's address for
            # QUIC with nothing forwarded there, joined over QUIC: what its router lets back answers
            # that connection only, not a datagram from a new port of the prober
            runs = {
                "tcp": (forwarded, over["tcp"], ["/ip4/0.0.0.0/tcp/4001",
                                                 f"/ip4/{forwarded.wan_addr}/tcp/4001"]),
                "quic": (forwarded, over["quic"], ["/ip4/0.0.0.0/udp/4002/quic-v1",
                                                  f"/ip4/{forwarded.wan_addr}/udp/4002/quic-v1"]),
                "closed": (closed, over["tcp"], ["/ip4/0.0.0.0/tcp/0"]),
                "closed-quic": (closed, over["quic"], ["/ip4/0.0.0.0/udp/4003/quic-v1",
                                                       f"/ip4/{closed.wan_addr}/udp/4003/quic-v1"]),
            }
            answers = {}
            for name, (home, maddr, extra) in runs.items():
                out = subprocess.run(
                    lab.prefix(home.ns) + [sys.executable, "-c", _NODE_SCRIPT, maddr, *extra],
                    capture_output=True,
                    text=True,
                    timeout=90,
                )
                assert out.returncode == 0, out.stderr[-2000:]
                answers[name] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            assert stop(boot) == 0, log.read_text()[-2000:]
    assert answers["tcp"] == {
        "reachable": True,
        "client_mode": False,
        "reason": f"dialed it back at {forwarded.wan_addr}:4001",
    }
    assert answers["quic"] == {
        "reachable": True,
        "client_mode": False,
        "reason": f"dialed it back at {forwarded.wan_addr}:4002 (QUIC)",
    }
    assert answers["closed"]["reachable"] is False and answers["closed"]["client_mode"] is True
    assert f"connects from {closed.wan_addr}" in answers["closed"]["reason"], answers
    assert answers["closed-quic"]["reachable"] is False and answers["closed-quic"]["client_mode"] is True
    assert f"{closed.wan_addr}:4003 (QUIC): no answer within" in answers["closed-quic"]["reason"], answers


# ---- two trainers behind NAT ----
STEPS = 2
NAMES = ("public", "home0", "home1")


def _p2pd_args(pid: int) -> list[list[str]]:
    out = []
    for child in descendants(pid):
        argv = [a.decode() for a in command_line(child).split(b"\0") if a]
        if argv and argv[0].endswith("p2pd"):
            out.append(argv)
    return out


@pytest.fixture(scope="module")
def nat_run(tmp_path_factory):
    _lab_or_skip()
    tmp = tmp_path_factory.mktemp("nat")
    keys = {name: tmp / f"{name}.key" for name in NAMES}
    ids = {name: peer_id_of(key) for name, key in keys.items()}  # creates the key files
    common = (
        *ROUND_ARGS,
        *TINY_MODEL,
        "--max-outer-steps",
        str(STEPS),
        "--swarm.min_group_size",
        "3",
        "--config",
        "configs/debug.toml",
        # the first round waits for the slowest starter instead of failing and starting over
        "--swarm.matchmaking_timeout",
        "60",
        "--log.progress_bar",
        "false",
    )
    procs, started = {}, time.monotonic()
    with NatLab(homes=2) as lab:
        host = f"/ip4/{lab.public_addr}/tcp/31337"
        where = {"public": lab.public, "home0": lab.homes[0].ns, "home1": lab.homes[1].ns}
        extra = {"public": ["--host-maddrs", host]}  # the homes listen on the default 0.0.0.0, port 0
        try:
            for name in NAMES:  # no --client-mode anywhere: the homes must find out themselves
                own = ["--identity", str(keys[name]), "--metrics", str(tmp / f"{name}.jsonl")]
                way_in = extra.get(name, ["--initial-peers", f"{host}/p2p/{ids['public']}"])
                args = cli("train", *common, *own, *way_in)
                procs[name] = start(lab.prefix(where[name]) + args, tmp / f"{name}.log")
            p2pd = {}
            for name in ("home0", "home1"):  # after the switch: the client's p2pd, its flags
                wait_until(lambda n=name: SWITCH in (tmp / f"{n}.log").read_text(), 120, f"{name} to switch")
                p2pd[name] = wait_until(
                    lambda n=name: [a for a in _p2pd_args(procs[n].pid) if "-dhtClient=1" in a],
                    30,
                    f"{name}'s client-mode p2pd",
                )
            codes = {name: p.wait(timeout=200) for name, p in procs.items()}
        finally:
            stop_all(procs)  # only those still running: a test that timed out
        traffic = {home.ns: lab.forwarded_bytes(home) for home in lab.homes}
    wall = time.monotonic() - started
    records = {name: read_metrics(tmp / f"{name}.jsonl", "outer_step") for name in NAMES}
    logs = {name: (tmp / f"{name}.log").read_text() for name in NAMES}
    return dict(
        codes=codes,
        ids=ids,
        records=records,
        logs=logs,
        p2pd=p2pd,
        wall=wall,
        traffic=dict(zip(("home0", "home1"), traffic.values(), strict=True)),
    )


@pytest.mark.timeout(300)
def test_nat_all_three_finish_cleanly(nat_run):
    tails = "\n".join(f"--- {n}\n{text[-2000:]}" for n, text in nat_run["logs"].items())
    assert nat_run["codes"] == {name: 0 for name in NAMES}, tails


@pytest.mark.timeout(300)
def test_nat_homes_switch_by_themselves_in_one_line(nat_run):
    logs, ids = nat_run["logs"], nat_run["ids"]
    for home in ("home0", "home1"):
        lines = [line for line in logs[home].splitlines() if SWITCH in line]
        assert len(lines) == 1, lines
        assert "connects from 10.77.0." in lines[0] and "switching to client mode" in lines[0], lines[0]
    assert SWITCH not in logs["public"]
    probes = [line for line in logs["public"].splitlines() if "reachability probe from" in line]
    assert len(probes) == 2 and all("unreachable" in line for line in probes), probes
    assert {ids["home0"], ids["home1"]} == {line.split("probe from ")[1].split(":")[0] for line in probes}


@pytest.mark.timeout(300)
def test_nat_homes_are_in_every_round_with_their_tokens(nat_run, record_property):
    records, ids = nat_run["records"], nat_run["ids"]
    for name in NAMES:
        assert [r["outer_step"] for r in records[name]] == list(range(1, STEPS + 1)), name
    for step in range(STEPS):
        rnd = {name: records[name][step] for name in NAMES}
        tokens = sum(r["tokens"] for r in rnd.values())
        assert all(r["tokens"] > 0 for r in rnd.values()), rnd
        for name, r in rnd.items():
            assert r["group_size"] == 3 and set(r["members"]) == set(ids.values()), (name, r)
            assert r["members"][0] == ids["public"], "the homes are clients: they reduce no slice"
            assert r["excluded"] == []
            assert r["total_weight"] == pytest.approx(tokens, rel=1e-6), f"round {step + 1} on {name}"
        hashes = {r["params_sha256"] for r in rnd.values()}
        assert len(hashes) == 1, f"outer step {step + 1}: {hashes}"
    # relayed bytes: a client's p2pd runs with the relay transport off, so none of its bytes can go
    # through a relay; and the routers saw no byte between the homes (no direct or punched path)
    for home in ("home0", "home1"):
        assert all("-relay=0" in argv for argv in nat_run["p2pd"][home]), nat_run["p2pd"][home]
        t = nat_run["traffic"][home]
        assert t["to_other_homes"] == t["from_other_homes"] == 0, t
        assert t["to_public"] > 0 and t["from_public"] > 0, t
    report = {home: {"relayed_bytes": 0, **nat_run["traffic"][home]} for home in ("home0", "home1")}
    record_property("nat_traffic", report)
    print(
        f"\nNAT run: {STEPS} rounds in {nat_run['wall']:.0f}s; bytes through a relay: 0; "
        f"router byte counters: {report}"
    )
