"""Image classification sets (CIFAR-10/100, bundled digits) and on-device augmentation."""

from compressjax.datasets.augment import augment_image
from compressjax.datasets.augment import augment_batch
from compressjax.datasets.augment import crop
from compressjax.datasets.augment import flip_lr
from compressjax.datasets.augment import normalize
from compressjax.datasets.augment import random_crop
from compressjax.datasets.augment import random_flip
from compressjax.datasets.batches import DeviceData
from compressjax.datasets.batches import eval_batch
from compressjax.datasets.batches import image_data_fn
from compressjax.datasets.batches import num_eval_batches
from compressjax.datasets.batches import steps_per_epoch
from compressjax.datasets.batches import to_device
from compressjax.datasets.batches import TrainSet
from compressjax.datasets.batches import train_batch
from compressjax.datasets.batches import train_indices
from compressjax.datasets.cifar import load_cifar
from compressjax.datasets.cifar import read_cifar
from compressjax.datasets.digits import digits_images
from compressjax.datasets.digits import load_digits
from compressjax.datasets.registry import DATASETS
from compressjax.datasets.registry import load_dataset
from compressjax.datasets.splits import VisionData
from compressjax.datasets.splits import channel_stats
from compressjax.datasets.splits import make_vision_data
from compressjax.datasets.splits import split_indices
