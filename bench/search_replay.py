"""The trainer's recipe search replayed on one model, with and without augmentation: which recipe
each setting would choose (best validation score of each short trial), so a choice made under one
setting can be checked against the other.

    python bench/search_replay.py ../shared/datasets/elpv --arch maxmin \
        --out bench/results/search-replay-elpv-maxmin.json
"""

from __future__ import annotations

from dataclasses import replace

from fit_variants import compare, parser

from training.poc import SEARCH_GRID, SEARCH_SEED, PocConfig


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(seeds=[SEARCH_SEED])
    args = p.parse_args()
    default = replace(PocConfig(data=str(args.data), out="-").train, select_metric="macro_f1")
    epochs = max(3, default.epochs // 3)  # as training.poc.run_poc sets the trials' length
    rows = {}
    for label, augment in (("with augmentation", default.augment), ("without augmentation", ())):
        for optimizer, lr in SEARCH_GRID:
            rows[f"{label}: {optimizer} lr {lr:g}"] = replace(
                default, optimizer=optimizer, lr=lr, epochs=epochs, augment=augment
            )
    compare(args, {name: (cfg, None) for name, cfg in rows.items()})


if __name__ == "__main__":
    main()
