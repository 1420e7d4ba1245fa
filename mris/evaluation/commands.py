"""CLI: ``mris evaluate`` (translates options into ``run.EvaluateRequest``)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from mris.constants import CARTILAGES
from mris.options import DEFAULT_K, MAX_K
from mris.synthesis import NAN_RULES, PAPER_NAN_RULE


def _command_line(context: typer.Context) -> str:
    """The command as the options were understood (every option spelled out, defaults included),
    so the report says exactly what would make it again."""
    words = ["mris", context.info_name or "evaluate"]
    for parameter in context.command.params:
        value = context.params.get(parameter.name)
        flag = max(parameter.opts, key=len)
        if isinstance(value, bool):
            if value:
                words.append(flag)
        elif value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        context: typer.Context,
        manifest: Path = typer.Option(
            ..., help="Manifest with database, downstream and test splits."
        ),
        model: Path = typer.Option(
            ..., help="Model bundle with the separate variant (and its localiser)."
        ),
        index: Path = typer.Option(
            ...,
            help="Index root (or bundle) of the model's separate variant; missing indexes are "
            "built under OUT/work/.",
        ),
        out: Path = typer.Option(
            ...,
            help="Report folder: report.md, report.json, figures; OUT/work/ keeps what the "
            "evaluation trains or builds.",
        ),
        methods: str = typer.Option(
            ",".join(("mris-c", "mris-s", "unet", "pix2pix", "mean", "oracle")),
            help="Comma-separated: mris-c, mris-s, unet, pix2pix, mean, oracle.",
        ),
        profile: str = typer.Option(
            "quick",
            help="Profile for what must be trained (U-Net, pix2pix, combined encoders): quick | "
            "reference | paper.",
        ),
        epochs: int | None = typer.Option(
            None, min=1, help="Override the profile's epochs for what is trained here."
        ),
        unet: Path | None = typer.Option(
            None, help="A trained U-Net folder (mris train-unet) instead of training one."
        ),
        pix2pix: Path | None = typer.Option(
            None, help="A trained pix2pix folder (mris train-pix2pix) instead of training one."
        ),
        combined_model: Path | None = typer.Option(
            None, help="A model bundle with the combined variant, when --model lacks it."
        ),
        rois: str = typer.Option(
            "auto",
            help="auto (the localiser when the bundle has one) | localiser | keypoints (the "
            "manifest's).",
        ),
        k: int = typer.Option(DEFAULT_K, min=1, max=MAX_K, help="Neighbours per synthesis."),
        nan_rule: str = typer.Option(
            PAPER_NAN_RULE,
            help=f"NaN rule of the MRIS maps: {' | '.join(NAN_RULES)} "
            "(all: the reference's, cartilage where every neighbour has it).",
        ),
        bootstrap: int = typer.Option(
            1000, min=0, help="Bootstrap resamples of subjects for the 95 % intervals."
        ),
        seed: int = typer.Option(
            0, help="Seed of the bootstrap, the classifier folds, the examples and any training."
        ),
        threads: int | None = typer.Option(
            None, min=1, help="CPU threads (default: all usable cores)."
        ),
        device: str = typer.Option("auto", help="auto | cpu | cuda (onnxruntime, FAISS)."),
        examples: int = typer.Option(6, min=0, help="Test knees in examples.png."),
        classifiers: str = typer.Option(
            "resnet18,logistic",
            help="Table 3's classifiers: resnet18 (the paper's, "
            "needs torch), logistic (8 x 8 cell means, scikit-learn); comma-separated.",
        ),
        classifier_epochs: int | None = typer.Option(
            None,
            min=1,
            help="Epochs of Table 3's ResNet-18 (default: the profile's, quick 4, paper 30).",
        ),
        classifier_weights: Path | None = typer.Option(
            None,
            help="A local ResNet-18 state dict (e.g. ImageNet) to "
            "fine-tune from in Table 3; nothing is downloaded.",
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Reproduce the paper's tables (retrieval, error by KL grade, downstream) as a report with
        figures."""
        from rich.table import Table

        from mris.evaluation.report import METHOD_LABELS, findings
        from mris.evaluation.run import EvaluateRequest, Progress
        from mris.evaluation.run import evaluate as run_evaluate
        from mris.progress import console, progress_bar

        request = EvaluateRequest(
            manifest=manifest,
            model=model,
            index=index,
            out=out,
            methods=methods,
            profile=profile,
            epochs=epochs,
            unet=unet,
            pix2pix=pix2pix,
            combined_model=combined_model,
            rois=rois,
            k=k,
            nan_rule=nan_rule,
            resamples=bootstrap,
            seed=seed,
            threads=threads,
            device=device,
            examples=examples,
            command=_command_line(context),
            classifiers=classifiers,
            classifier_epochs=classifier_epochs,
            classifier_weights=classifier_weights,
        )
        with progress_bar(enabled=not quiet) as bars:

            def stage(description: str, total: int):
                return bars.add_task(description, total=total)

            def advance(task, completed: int) -> None:
                bars.update(task, completed=completed)

            report = run_evaluate(
                request, Progress(log=lambda m: bars.console.print(m), stage=stage, advance=advance)
            )

        t1 = Table(title="Table 1: retrieval recall % (test first visits)")
        for column in (
            "embedding",
            "gallery",
            "R@1",
            "R@5",
            "R@10",
            "R@20",
            "chance R@20",
            "R@20 / chance",
        ):
            t1.add_column(column)
        for label, row in report["table1_retrieval"].items():
            t1.add_row(
                label,
                str(row["gallery"]),
                *(f"{100 * row['recall'][key]:.1f}" for key in ("R@1", "R@5", "R@10", "R@20")),
                f"{100 * row['chance']['R@20']:.1f}",
                f"{row['ratio_to_chance']['R@20']:.1f}x",
            )
        console.print(t1)
        t2 = Table(
            title="Table 2: the reference's statistic, mm: mean over test knee-visits of each "
            "pair's median ± MAD "
            "absolute error at 256 x 256"
        )
        for column in ("method", "femoral", "tibial"):
            t2.add_column(column)
        for method, entry in report["table2_reference"]["methods"].items():
            t2.add_row(
                METHOD_LABELS.get(method, method),
                *(
                    f"{entry[n]['all']['median']:.3f} ± {entry[n]['all']['mad']:.3f}"
                    for n in CARTILAGES
                ),
            )
        console.print(t2)
        uncertainty = report.get("uncertainty") or {}
        if uncertainty.get("methods"):
            console.print(_uncertainty_table(uncertainty))
        t3 = report.get("table3_downstream")
        if t3 and t3["methods"]:
            table = Table(title="Table 3: downstream (train downstream, test test)")
            for column in ("maps", "KLG acc", "KLG bal. acc", "progression AP", "progression AUC"):
                table.add_column(column)
            for method, entry in t3["methods"].items():
                klg, prog = entry.get("klg", {}), entry.get("progression", {})
                table.add_row(
                    METHOD_LABELS[method],
                    *(
                        f"{v:.3f}" if v is not None else "-"
                        for v in (
                            klg.get("accuracy"),
                            klg.get("balanced_accuracy"),
                            prog.get("average_precision"),
                            prog.get("roc_auc"),
                        )
                    ),
                )
            console.print(table)
        for line in findings(report):
            console.print(f"- {line}")
        console.print(f"report: {out / 'report.md'}")


def _uncertainty_table(section: dict):
    """The console's summary of the report's uncertainty section (all grades)."""
    from rich.table import Table

    from mris.evaluation.report import METHOD_LABELS

    intervals = section.get("intervals") or {}
    table = Table(
        title=f"Uncertainty (test split, NaN rule {section['nan_rule']}): % of pixels within "
        "±1 / ±2 SD, Spearman of a knee's mean SD with its MAE, calibrated intervals"
    )
    for column in ("method", "map", "±1 SD", "±2 SD", "Spearman", "interval coverage"):
        table.add_column(column)
    for method, by_cartilage in section["methods"].items():
        for name in CARTILAGES:
            entry = by_cartilage[name]
            within = entry["sd_coverage"]["all"]
            rho = entry["spearman_sd_mae"]["all"]["rho"]
            cell = intervals.get(name, {}).get("all") if method == intervals.get("method") else None
            table.add_row(
                METHOD_LABELS.get(method, method),
                name,
                *(
                    "-" if within[key] is None else f"{100 * within[key]:.1f}"
                    for key in ("within_1sd", "within_2sd")
                ),
                "-" if rho is None else f"{rho:.2f}",
                "-"
                if not cell or cell["coverage"] is None
                else f"{100 * cell['coverage']:.1f} (stated {100 * intervals['coverage']:.0f}) "
                f"{cell['verdict']}",
            )
    return table
