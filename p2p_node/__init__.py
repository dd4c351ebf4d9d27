"""p2p-node: a trio-native peer-to-peer inference node.

The node is built in `p2p_node.node` (the composition root) from a `NodeConfig`;
backends and the manager that routes between them live in the `backends` package.
"""

from p2p_node.config import ConfigError, NodeConfig, load_config

__all__ = ["ConfigError", "NodeConfig", "load_config"]
