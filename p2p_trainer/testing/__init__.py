"""Tools for tests and benchmarks, not part of the product: several swarm peers in one process
(``testing.swarm``), fault hooks that make a peer misbehave (``testing.faults``), and a test entry
point that runs the real CLI with such faults (``python -m p2p_trainer.testing.peer``). Nothing in
the package imports this; a user's config has no test knob."""
