"""One part of the trainer's default recipe at a time, added to the plain loop's recipe, on the
trainer's own ``fit``, split, seeds and models: which part moves test macro F1.

The starting recipe is the plain loop's of bench/fidelity.py (SGD-Nesterov, one-cycle to 0.05,
batch 64, no class weights, no augmentation); each row adds one default of the trainer.

    python bench/recipe_ablation.py ../shared/datasets/elpv --arch baseline --seeds 0 1 2 \
        --out bench/results/recipe-elpv-baseline.json
"""

from __future__ import annotations

from dataclasses import replace

from fit_variants import compare, parser

from training.poc import PocConfig


def main() -> None:
    args = parser(__doc__).parse_args()
    # Skewed sets select checkpoints on macro F1 in the trainer too (training.poc.choose_metric).
    default = replace(PocConfig(data=str(args.data), out="-").train, select_metric="macro_f1")
    plain = replace(
        default,
        optimizer="sgd",
        lr=0.05,
        batch_size=64,
        augment=(),
        class_weighting="none",
        select_metric="macro_f1",
    )
    rows = {
        "the plain loop's recipe": plain,
        "+ the trainer's augmentation": replace(plain, augment=default.augment),
        "+ shifts only": replace(plain, augment=("shift",)),
        "+ flips only": replace(plain, augment=("hflip",)),
        "+ the trainer's augmentation, twice the epochs": replace(
            plain, augment=default.augment, epochs=2 * default.epochs
        ),
        "the trainer's defaults": default,
        "the trainer's defaults, no augmentation": replace(default, augment=()),
        "the trainer's defaults, no augmentation, AdamW at 3e-4": replace(
            default, augment=(), optimizer="adamw", lr=3e-4
        ),
        "AdamW at 1e-3 on the trainer's defaults": replace(default, optimizer="adamw", lr=1e-3),
        "AdamW at 1e-3 on the trainer's defaults, no augmentation": replace(
            default, optimizer="adamw", lr=1e-3, augment=()
        ),
        "+ the trainer's class weights": replace(plain, class_weighting=default.class_weighting),
        "+ the trainer's batch size": replace(plain, batch_size=default.batch_size),
        "+ AdamW at 3e-4 (a recipe the search can choose)": replace(
            plain, optimizer="adamw", lr=3e-4
        ),
    }
    compare(args, {name: (cfg, None) for name, cfg in rows.items()})


if __name__ == "__main__":
    main()
