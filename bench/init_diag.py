"""How the layers' starting scale moves a batch-normalized model: He's against PyTorch's, side by
side, on the same split, seeds and batches.

The trainer's own ``fit`` with one fixed recipe (by default the plain loop's of bench/fidelity.py:
SGD-Nesterov, one-cycle to 0.05, batch 64, no class weights, no augmentation), once with the
models as they are built (PyTorch's initialization under batch norm) and once with He
initialization applied on top; prints test macro F1 and accuracy per seed, and writes JSON.

    python bench/init_diag.py ../shared/datasets/elpv --arch baseline --seeds 0 1 2 \
        --out bench/results/init-elpv.json
"""

from __future__ import annotations

from fit_variants import compare, engine, parser


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=engine.TrainConfig.epochs)
    args = p.parse_args()
    cfg = engine.TrainConfig(
        optimizer="sgd",
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=(),
        class_weighting="none",
        select_metric="macro_f1",
    )
    build = engine.create_model

    def with_he(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        model = build(*a, **kw)
        model._init_weights(maxmin=a[0].startswith("maxmin"))
        return model

    compare(args, {"torch init": (cfg, None), "he init": (cfg, with_he)})


if __name__ == "__main__":
    main()
