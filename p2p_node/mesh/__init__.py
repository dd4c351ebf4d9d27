"""The mesh: libp2p hosts that find each other, advertise what they serve, and carry
inference requests between nodes. Nothing here knows about backends: the node injects
the callbacks that serve a request and that learn about peers."""
