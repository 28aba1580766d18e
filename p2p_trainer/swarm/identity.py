"""Who we are and how we get in: multiaddr checks, the persistent identity key, joining the DHT.

The identity file (a libp2p RSA private key, the format `hivemind-dht --identity_path` writes)
fixes the peer id across restarts. The same key signs our DHT records, so a record's owner
marker and the peer id it claims can be checked against each other by anyone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from multiaddr import Multiaddr

from p2p_trainer.swarm.errors import MultiaddrError, SwarmError
from p2p_trainer.swarm.procs import abandon, die_with_parent

logger = logging.getLogger(__name__)

_TRANSPORTS = ("tcp", "udp")
_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")


def check_multiaddrs(values: Iterable[str], what: str, *, need_peer_id: bool = False) -> list[str]:
    """Parse every multiaddr; the first bad one raises MultiaddrError naming it and the reason."""
    checked = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise MultiaddrError(f"{what}: {value!r} is not a multiaddr")
        try:
            maddr = Multiaddr(value.strip())
        except Exception as e:  # multiaddr raises several unrelated types
            raise MultiaddrError(f"{what}: {value!r} is not a valid multiaddr: {e}") from None
        names = [p.name for p in maddr.protocols()]
        if need_peer_id:
            if names[-1] != "p2p":
                raise MultiaddrError(f"{what}: {value!r} must end with /p2p/<peer id>")
            if not any(n in _HOSTS for n in names) or not any(n in _TRANSPORTS for n in names):
                raise MultiaddrError(
                    f"{what}: {value!r} needs a host and a port, e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm..."
                )
        checked.append(str(maddr))
    return checked


def check_announce_maddrs(values: Iterable[str]) -> list[str]:
    checked = check_multiaddrs(values, "swarm.announce_maddrs")
    for value in checked:
        maddr = Multiaddr(value)
        for proto in _TRANSPORTS:
            if proto in [p.name for p in maddr.protocols()] and maddr.value_for_protocol(proto) == "0":
                raise MultiaddrError(f"swarm.announce_maddrs: {value!r} needs an explicit port, not 0")
    return checked


class _FileRSAKey(RSAPrivateKey):
    """hivemind's RSAPrivateKey built from an existing key instead of a fresh one."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:  # deliberately skips key generation
        self._private_key = key


@dataclass
class Identity:
    path: str  # the libp2p key file handed to p2pd
    private_key: RSAPrivateKey  # signs our DHT records
    peer_id: str  # base58, equal to the p2pd peer id
    existed: bool  # False when we created the file just now
    temp_dir: str | None = None  # set when the key is throwaway (no --identity): removed on shutdown

    def cleanup(self) -> None:
        if self.temp_dir is not None:
            for name in os.listdir(self.temp_dir):
                os.remove(os.path.join(self.temp_dir, name))
            os.rmdir(self.temp_dir)
            self.temp_dir = None


def load_identity(path: str) -> Identity:
    """Load (or create, if missing) the key file; an empty path makes a throwaway key for this process."""
    temp_dir = None
    if not path:
        temp_dir = tempfile.mkdtemp(prefix="p2p-trainer-id-")
        path = os.path.join(temp_dir, "identity.key")
    existed = os.path.isfile(path)
    if not existed:
        try:
            P2P.generate_identity(path)
        except OSError as e:
            raise SwarmError(f"cannot create identity file {path}: {e}") from None
    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("only RSA keys are supported (the kind `hivemind-dht --identity_path` makes)")
        key = serialization.load_der_private_key(proto.data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the key is not an RSA private key")
        with open(path, "rb") as f:
            peer_id = PeerID.from_identity(f.read()).to_base58()
    except (OSError, ValueError) as e:  # protobuf's DecodeError is a ValueError too
        raise SwarmError(f"identity file {path} is unusable: {e}") from None
    return Identity(path, _FileRSAKey(key), peer_id, existed, temp_dir)


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The libp2p peer id of an RSA key in hivemind's owner-marker format (OpenSSH encoding)."""
    key = serialization.load_ssh_public_key(ssh_public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(proto).digest()).to_base58()  # multihash: sha2-256, 32 bytes


class _SwarmDHT(hivemind.DHT):
    """hivemind's DHT process, made to exit (with its p2pd) when the training process dies; its p2pd
    runs Go code on at most ``daemon_threads`` cores (0: Go's default)."""

    def __init__(self, *args: Any, daemon_threads: int, **kwargs: Any) -> None:
        self._spawner_pid = os.getpid()  # both set before the base class forks the process
        self._daemon_threads = daemon_threads
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        die_with_parent(self._spawner_pid)
        if self._daemon_threads > 0:  # this process's environment is the one p2pd starts with
            os.environ["GOMAXPROCS"] = str(self._daemon_threads)
        super().run()


_FAILED_EXIT_S = 10.0  # a DHT process that reported a failed start leaves by itself within this


def _started(dht: _SwarmDHT) -> _SwarmDHT:
    """``dht`` running and ready; if its start fails or is interrupted (Ctrl+C, SIGTERM while we join),
    its half-started process and p2pd are gone when this returns: left alone, the interpreter's exit
    would join that process without a time limit. A process that reported its failure is given the
    time to leave by itself first: killed at an arbitrary point it could hold one of hivemind's
    cross-process locks (``MPFuture``), and every later DHT call of ours would wait on it forever."""
    try:
        dht.run_in_background(await_ready=True)
    except Exception:
        dht.join(_FAILED_EXIT_S)
        abandon(dht)  # only if it did not leave
        raise
    except BaseException:  # we are going down: nothing of ours will use those locks again
        abandon(dht)
        raise
    return dht


def _loopback_only(maddrs: Sequence[str]) -> bool:
    hosts = [m.split("/")[2] for m in maddrs if m.startswith(("/ip4/", "/ip6/"))]
    return len(hosts) == len(maddrs) > 0 and all(h.startswith("127.") or h == "::1" for h in hosts)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)  # p2pd's log timestamp


_RETRYABLE = (
    "failed to connect to bootstrap peers",
    "none of the initial_peers responded",
    "bootstrap failed",
)


def start_dht(
    *,
    identity: Identity,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    client_mode: bool,
    join_timeout: float,
    validators: Sequence[RecordValidatorBase],
    restart: bool = False,
    daemon_threads: int = 1,
) -> hivemind.DHT:
    """Start our DHT node (own process + p2pd), retrying unreachable initial peers with backoff.
    ``restart``: the identity was in use by our own node a moment ago, not by another peer.
    ``daemon_threads``: p2pd's GOMAXPROCS (0: Go's default; see ``SwarmConfig.daemon_threads``)."""
    deadline = time.monotonic() + join_timeout
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            return _started(_SwarmDHT(
                start=False,
                initial_peers=list(initial_peers) or None,
                host_maddrs=list(host_maddrs),
                announce_maddrs=list(announce_maddrs) or None,
                identity_path=identity.path,
                # a key we just made cannot be in use; checking an old one costs a second p2pd
                check_if_identity_free=identity.existed and not restart,
                client_mode=client_mode,
                # a client dials only full peers, which are reachable directly (swarm.reachability):
                # it neither needs a relay nor can serve as one, and no byte of it goes through one
                use_relay=not client_mode,
                record_validators=list(validators),
                # asking the LAN's router (UPnP) for a port mapping makes no sense for a loopback listener
                nat_port_map=not _loopback_only(host_maddrs),
                daemon_threads=daemon_threads,
            ))
        except Exception as e:  # hivemind raises P2PDaemonError, RuntimeError or ValueError here
            reason = _one_line(e)
            if "already taken" in reason:
                raise SwarmError(
                    f"identity {identity.path} is used by another running peer ({identity.peer_id}): "
                    "stop that peer or pass another --identity"
                ) from None
            if not (initial_peers and any(m in reason for m in _RETRYABLE)):
                raise SwarmError(f"could not start the swarm node: {reason} (check --host-maddrs)") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise SwarmError(
                    f"could not join the swarm through {', '.join(initial_peers)} after {attempt} attempts "
                    f"in {join_timeout:.0f}s ({reason}); check that the address is current (the peer id "
                    "after /p2p/ changes when a peer restarts without --identity), that the peer is running, "
                    "and that its port is reachable from here (firewall, NAT)"
                ) from None
            logger.warning(f"initial peers unreachable ({reason}); retrying in {min(delay, left):.1f}s")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)
