"""Flower's internals behind one folder: everything of cxr-fl that needs more of Flower than its app API.

``common/`` never imports Flower; ``client/``, ``server/`` and ``simulation/`` import only Flower's
app API (``flwr.app``, ``flwr.serverapp`` with its strategies, ``flwr.clientapp``,
``flwr.simulation`` and names of ``flwr.common`` itself: tests/test_flower_imports.py checks it).
What speaks Flower's runtime protocols, reads its protobuf messages or runs its processes lives
here, so that a Flower upgrade touches this folder only. This package imports ``common`` and
Flower, nothing else of the project.

- :mod:`flower_adapter.app_runner`: the site's warm ClientApp runner and its app allow-list (FAB hash);
- :mod:`flower_adapter.supernode_main`: the SuperNode process, its data memory bounded;
- :mod:`flower_adapter.supernode_log`: what a SuperNode's log lines say (refused, joined, lost session);
- :mod:`flower_adapter.packed_arrays`: a model's arrays packed into few Flower objects (both sides);
- :mod:`flower_adapter.grid`: the ServerApp's quick reply polling;
- :mod:`flower_adapter.fleet_api`: what the coordinator's Fleet gateway reads of Fleet API answers;
- :mod:`flower_adapter.superlink_owner_only`: the SuperLink that serves only its owner's connections;
- :mod:`flower_adapter.control`: the SuperLink's node list (Control API), for the console;
- :mod:`flower_adapter.central_dp`: a site's clipping of its round update under central DP.
"""

from __future__ import annotations

FLWR_VERSION = "1.42.0"
"""The one Flower version whose internals this project relies on (pyproject's ``flwr`` pin must be
the same: tests/test_flower_imports.py checks it): the warm site runtime (app_runner), the quick
reply polling (grid) and the owner-only SuperLink (superlink_owner_only) refuse or fall back on
any other."""
