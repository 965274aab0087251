"""The shape of a study record: its view slots, image and patch size, and text length.

Every module that builds, reads or describes a record (``records``, ``tfds_format``, the pipeline, the model)
agrees on these; they live apart so that the two record formats can share them without importing each other.
"""

VIEW_NAMES = ("current_frontal", "current_lateral", "prior_frontal", "prior_lateral")
NUM_VIEWS = len(VIEW_NAMES)
IMAGE_SIZE = 224
PATCH_SIZE = 16
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
MAX_TEXT_LEN = 128
