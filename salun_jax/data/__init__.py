"""Data: in-memory data sets (sources) and prompts and image folders for SD (prompts)."""

from salun_jax.data.prompts import IMAGENETTE_CLASS_NAMES as IMAGENETTE_CLASS_NAMES
from salun_jax.data.prompts import IMAGENETTE_EVAL_TEMPLATE as IMAGENETTE_EVAL_TEMPLATE
from salun_jax.data.prompts import IMAGENETTE_IMAGENET_INDICES as IMAGENETTE_IMAGENET_INDICES
from salun_jax.data.prompts import IMAGENETTE_TRAIN_TEMPLATE as IMAGENETTE_TRAIN_TEMPLATE
from salun_jax.data.prompts import NUDITY_FORGET_PROMPT as NUDITY_FORGET_PROMPT
from salun_jax.data.prompts import NUDITY_RETAIN_PROMPT as NUDITY_RETAIN_PROMPT
from salun_jax.data.prompts import PromptRecord as PromptRecord
from salun_jax.data.prompts import class_prompts as class_prompts
from salun_jax.data.prompts import read_image_folder as read_image_folder
from salun_jax.data.prompts import read_prompt_csv as read_prompt_csv
from salun_jax.data.sources import DATASET_STATS as DATASET_STATS
from salun_jax.data.sources import Dataset as Dataset
from salun_jax.data.sources import load_dataset as load_dataset
from salun_jax.data.sources import subset_per_class as subset_per_class
