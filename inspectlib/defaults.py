"""A PoC run's default budget and its bounds: the one source the trainer's configuration, its
command line and the service's training API all read."""

from __future__ import annotations

MODELS = ("baseline", "maxmin", "maxmin_half")
SIZE = 64  # input side in pixels: small parts' defects survive it, and the CPU trains in minutes
SIZE_MIN, SIZE_MAX = 16, 512  # below 16 px the third pooling leaves nothing; above, use a GPU
EPOCHS = 30  # enough for a small CNN on a few thousand images; raise for larger sets
EPOCHS_MAX = 500
SEEDS = 3  # the fewest that show spread; the verdict's interval also resamples the test images
SEEDS_MAX = 10
BATCH_SIZE = 32  # small datasets need enough optimizer steps per epoch
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
RETRIES = 2  # how often a failed seed is trained again, each time with a fresh seed
MAX_ESCAPE_RATE = 0.005  # the operating point's target: defective parts passed as good
