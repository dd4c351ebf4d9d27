"""Where the mesh meets the backend manager: peers become backends, and requests from
peers are served by this node's own backends. (`p2p_node.mesh` knows nothing of
backends; `backends` knows nothing of the mesh; this package knows both.)"""
