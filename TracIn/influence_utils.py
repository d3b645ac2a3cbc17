"""The seed's import path for TracIn's building blocks; they live in TracIn/core/ghost.py.

    from TracIn.influence_utils import InfluenceHook, ghost_influence_block, self_influence
"""
from TracIn.core.ghost import (Factors, InfluenceHook, SUPPORTED, ghost_dot, ghost_influence_block, projection,  # noqa: F401
                               self_influence, target_layers)
