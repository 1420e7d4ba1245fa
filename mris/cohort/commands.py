"""``mris cohort``: write a synthetic OAI-like cohort."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def cohort(
        out: Path = typer.Option(
            ..., "--out", help="Output folder (must be empty unless --force)."
        ),
        preset: str = typer.Option(
            "demo",
            "--preset",
            help="demo (300 subjects, small images) or eval (1,400 subjects, medium "
            "images: a test split of 540 knees at the first visit). Options below override it.",
        ),
        subjects: int = typer.Option(
            None, min=1, help="Number of subjects (default: the preset's)."
        ),
        seed: int = typer.Option(7, help="Seed: the same seed gives the same cohort."),
        image_size: str = typer.Option(
            None,
            "--image-size",
            help="small (about 400 px wide, 0.96-1.18 mm/px), medium (about 480 px, "
            "0.80-0.98 mm/px) or full (about 2900 px, 0.10-0.20 mm/px); default: the preset's.",
        ),
        grid: int = typer.Option(
            None, min=16, help="Atlas grid of the maps (default 128 small, 310 full)."
        ),
        workers: int = typer.Option(None, min=1, help="Worker processes (default: CPU count)."),
        force: bool = typer.Option(False, "--force", help="Write into a non-empty --out."),
    ) -> None:
        """Write radiograph DICOMs, thickness maps, manifest.csv, cohort_stats.json and
        preview.png."""
        from mris.cohort.generate import IMAGE_SIZES, PRESETS, CohortConfig, generate_cohort
        from mris.progress import make_console, progress_bar

        if preset not in PRESETS:
            raise typer.BadParameter(f"must be one of {', '.join(PRESETS)}", param_hint="--preset")
        subjects = subjects if subjects is not None else PRESETS[preset].subjects
        image_size = image_size if image_size is not None else PRESETS[preset].image_size
        if image_size not in IMAGE_SIZES:
            raise typer.BadParameter(
                f"must be one of {', '.join(IMAGE_SIZES)}", param_hint="--image-size"
            )
        config = CohortConfig(
            out=out, subjects=subjects, seed=seed, image_size=image_size, grid=grid, workers=workers
        )
        with progress_bar() as progress:
            task = progress.add_task("cohort (subjects)", total=subjects)
            summary = generate_cohort(
                config, force=force, on_subject=lambda done: progress.update(task, completed=done)
            )
        print_summary(make_console(), summary)


def print_summary(console, summary) -> None:
    stats = summary.stats
    mix = " ".join(f"KL{g} {float(v) * 100:.1f}%" for g, v in stats["baseline_klg_mix"].items())
    jsw = stats["medial_jsw_mm"]
    console.print(
        f"[bold green]cohort written[/] to {summary.out}: {summary.n_subjects} subjects, "
        f"{summary.n_radiographs} radiographs, {summary.n_pairs} knee-visit pairs, "
        f"{summary.disk_bytes / 1e6:.0f} MB in {summary.seconds:.0f} s"
    )
    console.print(f"  baseline {mix}   (OAI 38.6/17.8/26.5/13.9/3.3 %)")
    console.print(
        f"  healthy medial JSW: women {jsw['F']['mean']} +- {jsw['F']['sd']} mm, men "
        f"{jsw['M']['mean']} +- {jsw['M']['sd']} mm   (OAI 4.8 +- 0.7, 5.7 +- 0.8)"
    )
    console.print(
        f"  mean thickness FC {stats['mean_fc_mm']} mm, TC {stats['mean_tc_mm']} mm   (OAI "
        "2.28, 2.32)"
    )
    loss = stats["annual_thickness_loss_pct"]
    console.print(
        f"  thickness loss {loss['all']} %/yr (progressors {loss['progressors']} %/yr)   "
        "(OAI 1-3 %/yr in progressors)"
    )
    console.print(
        f"  KL progression by 48 months {stats['progression_48m_share'] * 100:.1f}% of knees "
        "seen at 48   (OAI about 15 %)"
    )
    console.print(
        f"  NaN share FC {stats['nan_share']['fc']}, TC {stats['nan_share']['tc']}   (OAI "
        "about 0.40)"
    )
    jsn = stats["medial_jsn_mm_per_year"]
    console.print(
        f"  medial JSN {jsn['all']} mm/yr (KL>=2 {jsn['klg_2_plus']} mm/yr)   (OAI 0.13 +- "
        "0.15 in OA knees, about 0.2)"
    )
    r = stats["jsw_thickness_r"]
    console.print(
        f"  JSW vs MR compartment thickness r: medial {r['medial']}, lateral {r['lateral']}   "
        f"(literature 0.43-0.81; OAI KL2-4 medial 0.78)"
    )
    console.print(
        f"  map variance explained by the radiograph-visible latents (linear R^2) "
        f"{stats['map_variance_explained_by_visible']}; outline vs bone size r "
        f"{stats['outline_vs_bone_size_r']}"
    )
    spacing = stats.get("spacing_mm") or {}
    if spacing:
        console.print(
            f"  test split: {stats['test_knees_first_visit']} knees at the first visit; "
            f"spacing {spacing['min']:g}-{spacing['max']:g} mm/px"
        )
