"""Flax linen models: the I/Q transformer (wireless foundation model) and others."""

from compressjax.models.iq_transformer import IQTransformer
from compressjax.models.iq_transformer import IQTransformerConfig
from compressjax.models.iq_transformer import config_from_params
from compressjax.models.iq_transformer import init_params
from compressjax.models.iq_transformer import student_config
from compressjax.models.iq_transformer import teacher_config
from compressjax.models.mobilenet_v2 import MobileNetV2
from compressjax.models.resnet import ResNet
from compressjax.models.resnet import resnet18
from compressjax.models.mlp import MLP
from compressjax.models.folding import batchnorm_pairs
from compressjax.models.folding import fold_batchnorm
from compressjax.models.folding import restore_batchnorm
from compressjax.models.folding import strip_batchnorm
