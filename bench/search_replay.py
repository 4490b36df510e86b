"""Short trials of the trainer's recipe grid on one model, with and without augmentation: each
grid entry trained on a one-cycle schedule of a third of the epochs, and its best validation
score. It shows how a short run ranks the recipes, to set beside full runs of the same recipes
(bench/recipe_ablation.py). The trainer's own search (training/poc.py) draws its short list
from the first third of the full schedule instead, then decides on full runs.

    python bench/search_replay.py ../shared/datasets/elpv --arch maxmin --seeds 1000 \
        --out bench/results/search-replay-elpv-maxmin.json
"""

from __future__ import annotations

from dataclasses import replace

from fit_variants import compare, parser

from training.poc import SEARCH_GRID, PocConfig


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(seeds=[1000])  # a seed apart from the reported seeds 0, 1, 2
    args = p.parse_args()
    default = replace(PocConfig(data=str(args.data), out="-").train, select_metric="macro_f1")
    epochs = max(3, default.epochs // 3)
    rows = {}
    for label, augment in (("with augmentation", default.augment), ("without augmentation", ())):
        for optimizer, lr in SEARCH_GRID:
            rows[f"{label}: {optimizer} lr {lr:g}"] = replace(
                default, optimizer=optimizer, lr=lr, epochs=epochs, augment=augment
            )
    compare(args, {name: (cfg, None) for name, cfg in rows.items()})


if __name__ == "__main__":
    main()
