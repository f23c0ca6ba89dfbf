"""NPR inside verl (``pip install npr[verl]``; docs/verl.md).

Importing this package registers npr's pieces in verl's registries, in the process that imports it:

- ``npr_papo`` policy loss and advantage estimator (``algos``): PAPO exactly as ``npr.algos``;
- ``npr`` reward manager and ``compute_score`` (``rewards``): npr's Stage-1 / Stage-3 rewards;
- ``npr_parallel`` agent loop (``agent_loop``): fork at ``</guideline>``, join at ``<takeaway>``;
- the tree-attention log-prob override for verl's actor (``actor``), with ``NPR_VERL_TREE_ACTOR=1``.

verl imports it in every worker through the ``verl.plugins`` entry point that npr's pyproject declares
(or ``VERL_USE_EXTERNAL_MODULES=npr.integrations.verl``).
"""

from __future__ import annotations

import os

# importing registers npr_papo, the npr reward manager and the npr_parallel agent loop
from npr.integrations.verl import agent_loop, algos, rewards  # noqa: F401

if os.environ.get("NPR_VERL_TREE_ACTOR") == "1":  # verl builds npr's tree-attention actor (actor.py)
    from npr.integrations.verl.actor import use_tree_actor

    use_tree_actor()

__all__ = ["agent_loop", "algos", "rewards"]
