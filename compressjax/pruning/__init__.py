"""Pruning: masks kept in an optax wrapper's state, scores, structures, schedules."""

from compressjax.pruning.materialize import materialize
from compressjax.pruning.schedules import Schedule
from compressjax.pruning.schedules import iterative
from compressjax.pruning.schedules import one_shot
from compressjax.pruning.schedules import polynomial
from compressjax.pruning.scores import GLOBAL_NORMALIZED
from compressjax.pruning.scores import SCORES
from compressjax.pruning.structures import KINDS as STRUCTURES
from compressjax.pruning.wrapper import PruningState
from compressjax.pruning.wrapper import SCOPES
from compressjax.pruning.wrapper import find_state
from compressjax.pruning.wrapper import masks
from compressjax.pruning.wrapper import sparsity
from compressjax.pruning.wrapper import wrap
