"""Training: state, jitted steps, the loop, multi-task losses, evaluation, cost, checkpoints."""

from compressjax.training import checkpoint
from compressjax.training import metrics
from compressjax.training import parallel
from compressjax.training.checkpoint import RunCheckpoints
from compressjax.training.evaluation import evaluate
from compressjax.training.evaluation import make_eval_batches
from compressjax.training.evaluation import reference_receivers
from compressjax.training.loop import Diverged
from compressjax.training.loop import progress_line
from compressjax.training.loop import train
from compressjax.training.measure import flops
from compressjax.training.measure import latency
from compressjax.training.measure import model_cost
from compressjax.training.measure import packed_bytes
from compressjax.training.measure import param_counts
from compressjax.training.multitask import TASKS
from compressjax.training.multitask import kd_task_losses
from compressjax.training.multitask import multitask_data_fn
from compressjax.training.multitask import multitask_forward
from compressjax.training.multitask import task_losses
from compressjax.training.steps import TrainState
from compressjax.training.steps import create_train_state
from compressjax.training.steps import make_predict_fn
from compressjax.training.steps import make_train_step
from compressjax.training.steps import stack
from compressjax.training.steps import unstack
