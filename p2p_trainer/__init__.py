"""p2p-trainer: decentralized low-communication training."""
