import sys

from p2p_node.cli import main

sys.exit(main())
