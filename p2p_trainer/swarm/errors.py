"""Errors of the swarm layer. Each message is one line that says what went wrong and what to check."""

from __future__ import annotations


class SwarmError(RuntimeError):
    """Joining or talking to the swarm failed; the CLI prints the message and exits 2."""


class MultiaddrError(SwarmError, ValueError):
    """A multiaddr given by the user is malformed; the message names it."""


class RoundFailed(SwarmError):
    """This round could not complete for this peer; the caller keeps its parameters unchanged."""
