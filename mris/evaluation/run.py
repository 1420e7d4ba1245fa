"""``mris evaluate`` as a library call: artefacts -> ROIs -> Table 1 -> every method on the test
and downstream splits -> Tables 2 and 3 -> report. ``commands.py`` only translates the CLI.

Artefacts (what is missing is made, under ``OUT/work/``, by the same ``mris`` commands a user
would type, so an interrupted evaluation resumes where it stopped):

- MRIS-S: the ``separate`` variant of ``--model`` and an index of it (``--index`` when it holds
  that variant built with these encoders, else one built into ``work/index-separate``).
- MRIS-C: the ``combined`` variant of ``--model``, else ``--combined-model``, else
  ``mris train --variant combined --no-localiser`` into ``work/model-combined`` with
  ``--profile``; its index likewise (``work/index-combined``).
- U-Net: ``--unet``, else ``mris train-unet`` into ``work/unet`` with ``--profile``.
- pix2pix: ``--pix2pix``, else ``mris train-pix2pix`` into ``work/pix2pix`` with ``--profile``
  (``BASELINES`` lists the direct-synthesis methods; each is evaluated by ``UnetMethod``).

Every method sees the same ROIs (``methods.collect_rois``: the localiser of ``--model`` when
it has one, as the service finds knees, else the manifest's keypoints). The MRIS database is the
index's rows (the ``database`` split); the U-Net trains on the same split. MRIS maps use the NaN
rule ``nan_rule`` (default ``all``, the reference's, ``mris.synthesis.PAPER_NAN_RULE``): the
tables are comparisons with the paper; the report records the rule.

``evaluate`` is a sequence of named stages: ``load_inputs`` (-> ``EvaluationInputs``),
``train_missing`` (-> ``Artefacts``), ``load_pipelines``, ``collect_roi_sets`` (-> ``RoiSet`` per
split), ``retrieval_table`` (Table 1), ``run_methods`` (-> ``MethodResults``; the downstream
split first, so that an interval calibration can be fitted on it before the test split is
measured), Tables 2 and 3 (``reference_table``, ``error_table``, ``downstream_stage``), the
uncertainty section (``uncertainty.uncertainty_table``), ``build_report`` and
``write_report``; each stage's seconds go to the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import CARTILAGES
from mris.errors import BadParameter, BundleInvalid, BundleMismatch, ManifestError, MrisError
from mris.evaluation.downstream import CLASSIFIERS, SplitMaps, classifier_map_px, downstream_table
from mris.evaluation.methods import (
    MeanMethod,
    MethodMaps,
    MrisMethod,
    OracleMethod,
    RoiSet,
    UnetMethod,
    collect_rois,
)
from mris.evaluation.reference_stats import ReferenceErrors, reference_table
from mris.evaluation.tables import (
    KL_GRADES,
    KneeErrors,
    error_table,
    first_visit_positions,
    retrieval_row,
)
from mris.evaluation.uncertainty import UncertaintyTally, uncertainty_table
from mris.fsutil import sha256_file
from mris.manifest import Manifest, ManifestRow, read_manifest
from mris.model_bundle import ModelBundle, load_model_bundle
from mris.options import SynthesisOptions
from mris.synthesis import DEFAULT_NAN_RULE, PAPER_NAN_RULE, NanRule
from mris.thickness import load_thickness_map

METHODS = ("mris-c", "mris-s", "unet", "pix2pix", "mean", "oracle")
ROI_CHOICES = ("auto", "localiser", "keypoints")
BATCH = 32
REPORT_FORMAT = "mris-evaluation/1"


@dataclass(frozen=True)
class Baseline:
    """A direct-synthesis method: the command that trains it and the card its folder holds."""

    command: str
    card: str
    title: str


BASELINES = {
    "unet": Baseline("train-unet", "unet-card.json", "the U-Net"),
    "pix2pix": Baseline("train-pix2pix", "pix2pix-card.json", "pix2pix"),
}


@dataclass
class EvaluateRequest:
    manifest: Path
    model: Path
    index: Path
    out: Path
    methods: Sequence[str] = METHODS
    profile: str = "quick"
    epochs: int | None = None
    unet: Path | None = None
    pix2pix: Path | None = None
    combined_model: Path | None = None
    rois: str = "auto"
    k: int = 20
    nan_rule: NanRule = PAPER_NAN_RULE
    resamples: int = 1000
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    examples: int = 6
    command: str = ""
    # Table 3: the classifiers (resnet18: the paper's; logistic: the fast second row), the
    # ResNet-18's epochs (None: the profile's) and an optional local state dict for it (nothing
    # is fetched)
    classifiers: Sequence[str] = CLASSIFIERS
    classifier_epochs: int | None = None
    classifier_weights: Path | None = None

    @property
    def work(self) -> Path:
        return self.out / "work"

    @cached_property
    def manifest_sha256(self) -> str:
        return sha256_file(self.manifest)


@dataclass
class Progress:
    """Hooks the CLI fills with rich progress bars; the defaults stay silent."""

    log: Callable[[str], None] = lambda message: None
    stage: Callable[[str, int], Any] = lambda description, total: None
    advance: Callable[[Any, int], None] = lambda task, completed: None


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [
        m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()
    ]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise BadParameter(
            f"--methods takes a comma-separated list of {', '.join(METHODS)}; got "
            f"{', '.join(unknown) or 'nothing'}"
        )
    return [m for m in METHODS if m in names]  # the table order


# ---------------------------------------------------------------------------------- artefacts
def _train_args(request: EvaluateRequest) -> list[str]:
    args = ["--profile", request.profile, "--seed", str(request.seed)]
    if request.epochs:
        args += ["--epochs", str(request.epochs)]
    if request.threads:
        args += ["--threads", str(request.threads)]
    return args


def _check_profile(request: EvaluateRequest, encoder_px: int) -> None:
    from mris.training.profiles import get_profile

    try:
        profile = get_profile(request.profile)
    except ValueError as exc:
        raise BadParameter(str(exc)) from exc
    if profile.encoder_px != encoder_px:
        raise BadParameter(
            f"--profile {request.profile} trains at {profile.encoder_px} px but the model bundle's "
            f"encoders take {encoder_px} px ROIs: give the profile the model was trained with"
        )


def _needs_torch(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise MrisError(
            f"{what} must be trained and torch is not installed: install the train extra "
            "(pip install 'mris[train]') or pass the trained folder"
        ) from exc


def _trained_on(
    request: EvaluateRequest,
    manifest_sha256: str | None,
    what: str,
    ours: bool,
    warnings: list[str],
) -> None:
    """Artefacts this evaluation trained must come from this manifest (else ``--out`` is stale);
    given ones may not (a model evaluated on another cohort), which the report says."""
    if manifest_sha256 is None or manifest_sha256 == request.manifest_sha256:
        return
    if ours:
        raise BadParameter(
            f"{request.work} holds {what} trained on another manifest: use a new --out "
            "(or delete that folder) to evaluate this one"
        )
    warnings.append(f"{what} was trained on another manifest than {request.manifest}")


def combined_model(
    request: EvaluateRequest, model: ModelBundle, warnings: list[str]
) -> ModelBundle:
    """The bundle holding the combined variant (``--model``, ``--combined-model`` or trained)."""
    from mris.subcommand import run_mris

    if "combined" in model.card.variants:
        return model
    if request.combined_model is not None:
        given = load_model_bundle(request.combined_model)
        _trained_on(
            request,
            given.card.training.get("manifest_sha256"),
            "the combined model",
            False,
            warnings,
        )
        return given
    out = request.work / "model-combined"
    if (out / "card.json").is_file():
        trained = load_model_bundle(out)
        _trained_on(
            request,
            trained.card.training.get("manifest_sha256"),
            "the combined model",
            True,
            warnings,
        )
        return trained
    _needs_torch("MRIS-C (the combined encoders)")
    _check_profile(request, model.card.preprocess_config.encoder_px)
    resume = (
        ["--resume"]
        if (request.work / "model-combined.training" / "run.json").is_file()
        else ["--force"]
    )
    run_mris(
        "train",
        "--manifest",
        str(request.manifest),
        "--out",
        str(out),
        "--variant",
        "combined",
        "--no-localiser",
        *_train_args(request),
        *resume,
    )
    return load_model_bundle(out)


def _baseline_manifest(folder: Path, card: str) -> str | None:
    path = folder / card
    return json.loads(path.read_text()).get("manifest_sha256") if path.is_file() else None


def baseline_dir(
    request: EvaluateRequest, method: str, encoder_px: int, warnings: list[str]
) -> Path:
    """The trained folder of a ``BASELINES`` method: given (``--unet`` / ``--pix2pix``), else
    ``work/<method>``, trained there by its command when missing (resumed when interrupted)."""
    from mris.subcommand import run_mris

    baseline = BASELINES[method]
    given = {"unet": request.unet, "pix2pix": request.pix2pix}[method]
    if given is not None:
        if not (given / baseline.card).is_file():
            raise BundleInvalid(
                f"--{method} {given} is not a {method} folder: {baseline.card} is missing"
            )
        _trained_on(
            request, _baseline_manifest(given, baseline.card), baseline.title, False, warnings
        )
        return given
    out = request.work / method
    if (out / baseline.card).is_file():
        _trained_on(request, _baseline_manifest(out, baseline.card), baseline.title, True, warnings)
    else:
        _needs_torch(f"The {method} baseline")
        _check_profile(request, encoder_px)
        resume = (
            ["--resume"]
            if (request.work / f"{method}.training" / "run.json").is_file()
            else ["--force"]
        )
        run_mris(
            baseline.command,
            "--manifest",
            str(request.manifest),
            "--out",
            str(out),
            *_train_args(request),
            *resume,
        )
    return out


def index_for(request: EvaluateRequest, variant: str, model: ModelBundle) -> Path:
    """An index root holding ``variant`` built with ``model_dir``'s encoders: ``--index`` when it
    is one, else ``work/index-<variant>`` (built and published there when missing)."""
    from mris.index.bundle import check_encoders, read_card
    from mris.index.publish import resolve
    from mris.subcommand import run_mris

    model_card = model.card
    own = request.work / f"index-{variant}"
    for candidate in (request.index, own):
        try:
            card = read_card(resolve(candidate))
        except MrisError:
            continue
        if card.variant != variant:
            continue
        try:
            check_encoders(card, model_card)
        except BundleMismatch:
            if candidate == request.index:
                raise
            continue
        return candidate
    run_mris(
        "index",
        "build",
        "--model",
        str(model.root),
        "--manifest",
        str(request.manifest),
        "--root",
        str(own),
        "--variant",
        variant,
        "--publish",
        "--quiet",
    )
    return own


# ------------------------------------------------------------------------------------- helpers
def _load_truth(manifest: Manifest, rows: Sequence[ManifestRow]) -> dict[str, np.ndarray]:
    return {
        "fc": np.stack([load_thickness_map(manifest.resolve_path(row.fc_path)) for row in rows]),
        "tc": np.stack([load_thickness_map(manifest.resolve_path(row.tc_path)) for row in rows]),
    }


def choose_examples(rows: Sequence[ManifestRow], count: int, seed: int) -> list[str]:
    """Up to ``count`` test pair ids spread over KL grades (first visits, one per grade in turn;
    knees without a grade come last)."""
    first = [rows[i] for i in first_visit_positions(rows)]
    rng = np.random.default_rng([seed, 10])
    grades = (*KL_GRADES, None)
    by_grade = {g: [r.pair_id for r in first if r.klg == g] for g in grades}
    for ids in by_grade.values():
        rng.shuffle(ids)
    chosen: list[str] = []
    while len(chosen) < count and any(by_grade.values()):
        for grade in grades:
            if by_grade[grade] and len(chosen) < count:
                chosen.append(by_grade[grade].pop())
    return chosen


@dataclass
class Examples:
    """Maps of the knees shown in the example figure."""

    pair_ids: list[str]
    rows: dict[str, ManifestRow] = field(default_factory=dict)
    roi: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = field(
        default_factory=dict
    )  # pair -> method -> name -> map


# ------------------------------------------------------------------------------------- stages
@dataclass
class EvaluationInputs:
    """What ``load_inputs`` checked: the methods, the classifiers, the manifest's splits, the
    model bundle (its ``separate`` variant) and the warnings the report carries."""

    methods: list[str]
    classifiers: list[str]
    manifest: Manifest
    test_rows: list[ManifestRow]
    downstream_rows: list[ManifestRow]
    model: ModelBundle
    warnings: list[str] = field(default_factory=list)


@dataclass
class Artefacts:
    """Every trained thing the methods use (``train_missing``) and the pipelines over the
    indexes (``load_pipelines``)."""

    models: dict[str, ModelBundle]  # variant -> bundle
    baseline_paths: dict[str, Path]
    baseline_notes: dict[str, str]  # method -> its card's width note (quick profiles shrink it)
    indexes: dict[str, Path] = field(default_factory=dict)
    pipelines: dict[str, Any] = field(default_factory=dict)  # variant -> Pipeline


@dataclass
class MethodResults:
    """What ``run_methods`` gathered from every method on both splits."""

    errors: KneeErrors
    reference: ReferenceErrors  # Table 2 as the reference computes it
    features: dict[str, SplitMaps]
    examples: Examples
    oracle: OracleMethod | None
    uncertainty: UncertaintyTally  # the uncertainty section's counts (and its calibration)


def load_inputs(request: EvaluateRequest) -> EvaluationInputs:
    """Stage 1: check the request, read the manifest, load the model bundle."""
    methods = parse_methods(request.methods)
    if request.rois not in ROI_CHOICES:
        raise BadParameter(f"--rois must be one of {', '.join(ROI_CHOICES)}, got {request.rois!r}")
    SynthesisOptions.parse(k=request.k, nan_rule=request.nan_rule)  # the service's limits
    classifiers = _parse_classifiers(request)
    manifest = read_manifest(request.manifest)
    test_rows = manifest.select(["test"])
    downstream_rows = manifest.select(["downstream"])
    if not test_rows:
        raise ManifestError(f"manifest {request.manifest} has no 'test' rows to evaluate on")
    model = load_model_bundle(request.model)
    if "separate" not in model.card.variants:
        raise BadParameter(
            f"model bundle {request.model} has no 'separate' variant (MRIS-S, the serving default)"
        )
    request.work.mkdir(parents=True, exist_ok=True)
    inputs = EvaluationInputs(
        methods=methods,
        classifiers=classifiers,
        manifest=manifest,
        test_rows=test_rows,
        downstream_rows=downstream_rows,
        model=model,
    )
    _trained_on(
        request,
        model.card.training.get("manifest_sha256"),
        f"the model bundle {request.model}",
        False,
        inputs.warnings,
    )
    return inputs


def train_missing(request: EvaluateRequest, inputs: EvaluationInputs) -> Artefacts:
    """Stage 2: the combined model and the baselines the methods need, trained when missing;
    refused when their preprocessing is not the model's."""
    model, methods, warnings = inputs.model, inputs.methods, inputs.warnings
    models = {"separate": model}
    if "mris-c" in methods:
        models["combined"] = combined_model(request, model, warnings)
        if models["combined"].card.preprocess != model.card.preprocess:
            raise BundleMismatch(
                f"the combined model {models['combined'].root} uses other "
                f"preprocessing constants than {request.model}"
            )
    encoder_px = model.card.preprocess_config.encoder_px
    baseline_paths = {
        method: baseline_dir(request, method, encoder_px, warnings)
        for method in BASELINES
        if method in methods
    }
    baseline_notes: dict[str, str] = {}
    for method, path in baseline_paths.items():
        baseline_card = json.loads((path / BASELINES[method].card).read_text())
        baseline_notes[method] = baseline_card.get("width_note", "")
        if baseline_card.get("preprocess") != model.card.preprocess:
            raise BundleMismatch(
                f"{BASELINES[method].title} {path} was trained with other "
                f"preprocessing constants than {request.model}"
            )
    return Artefacts(models=models, baseline_paths=baseline_paths, baseline_notes=baseline_notes)


def load_pipelines(request: EvaluateRequest, artefacts: Artefacts) -> None:
    """Stage 3: an index per variant (built when missing) and a ``Pipeline`` over each."""
    from mris.pipeline import Pipeline

    models = artefacts.models
    indexes = {variant: index_for(request, variant, bundle) for variant, bundle in models.items()}
    pipelines = {
        variant: Pipeline.load(
            models[variant].root,
            indexes[variant],
            variant=variant,
            device=request.device,
            intra_op_threads=request.threads or 0,
        )
        for variant in models
    }
    artefacts.indexes, artefacts.pipelines = indexes, pipelines


def collect_roi_sets(
    request: EvaluateRequest, inputs: EvaluationInputs, separate, progress: Progress
) -> tuple[dict[str, RoiSet], bool]:
    """Stage 4: the ROIs every method sees, per split (rows without their maps skipped), and
    whether the localiser found them."""
    from mris.index.embed import find_missing

    manifest = inputs.manifest
    use_localiser = request.rois == "localiser" or (
        request.rois == "auto" and separate.localiser is not None
    )
    if request.rois == "localiser" and separate.localiser is None:
        raise BadParameter(f"--rois localiser: model bundle {request.model} has no knee localiser")
    roi_sets: dict[str, RoiSet] = {}
    for split, rows in (("test", inputs.test_rows), ("downstream", inputs.downstream_rows)):
        missing = {pair for pair, _ in find_missing(manifest, rows)}  # no truth to compare with
        rows = [row for row in rows if row.pair_id not in missing]
        if not rows:
            continue
        task = progress.stage(f"ROIs {split}", len({r.radiograph_path for r in rows}))
        roi_sets[split] = collect_rois(
            separate,
            manifest,
            rows,
            use_localiser,
            tick=lambda done, total, task=task: progress.advance(task, done),
        )
        if missing:
            roi_sets[split].skipped["missing map"] = sorted(missing)
    if "test" not in roi_sets:
        raise ManifestError("no test row has its thickness maps: nothing to evaluate")
    if not roi_sets["test"].rows:
        raise ManifestError("no test radiograph could be read: nothing to evaluate")
    return roi_sets, use_localiser


def make_predictors(
    request: EvaluateRequest, methods: Sequence[str], artefacts: Artefacts
) -> tuple[dict[str, Any], OracleMethod | None]:
    """Stage 5: one predictor per method (MRIS-C, MRIS-S, the baselines, the mean), in the
    table order; the oracle apart (it is given the truth)."""
    pipelines, separate = artefacts.pipelines, artefacts.pipelines["separate"]
    mean_method = MeanMethod.from_index(separate.index)
    predictors: dict[str, Any] = {}
    if "mris-c" in methods:
        predictors["mris-c"] = MrisMethod(pipelines["combined"], request.k, request.nan_rule)
    if "mris-s" in methods:
        predictors["mris-s"] = MrisMethod(separate, request.k, request.nan_rule)
    for method, path in artefacts.baseline_paths.items():
        predictors[method] = UnetMethod(
            path,
            mean_method.atlas_masks,
            device=request.device,
            threads=request.threads,
            card=BASELINES[method].card,
        )
    if "mean" in methods:
        predictors["mean"] = mean_method
    oracle = OracleMethod.from_index(separate.index) if "oracle" in methods else None
    return predictors, oracle


def run_methods(
    request: EvaluateRequest,
    inputs: EvaluationInputs,
    artefacts: Artefacts,
    roi_sets: dict[str, RoiSet],
    progress: Progress,
) -> MethodResults:
    """Stage 6: every method on both splits, batch by batch: the classifiers' maps, the test
    split's errors (ours and the reference's), the uncertainty section's counts and the example
    figure's maps. The downstream split runs first: when the served MRIS-S bundle has no
    calibration, one is fitted on it before the test split is measured."""
    predictors, oracle = make_predictors(request, inputs.methods, artefacts)
    separate = artefacts.pipelines["separate"]
    map_px = classifier_map_px(request.profile) if "resnet18" in inputs.classifiers else None
    results = MethodResults(
        errors=KneeErrors(),
        reference=ReferenceErrors(),
        features={split: SplitMaps(map_px=map_px) for split in roi_sets},
        examples=Examples(
            pair_ids=choose_examples(roi_sets["test"].rows, request.examples, request.seed)
        ),
        oracle=oracle,
        uncertainty=UncertaintyTally.start(
            inputs.methods, getattr(separate.index, "calibration", None)
        ),
    )
    tally = results.uncertainty
    if tally.calibration is not None:
        tally.notes += _served_calibration_notes(tally.calibration, request.k)
    for split in sorted(roi_sets, key=lambda name: name != "downstream"):
        roi_set = roi_sets[split]
        if split == "test" and tally.wants_calibration_knees:
            progress.log("fitting the interval calibration on the downstream split")
            tally.fit_calibration(
                seed=request.seed,
                data={
                    "manifest": str(Path(request.manifest).resolve()),
                    "split": "downstream",
                    "k": request.k,
                    "nan_rule": DEFAULT_NAN_RULE,
                    "calibrated_index_version": separate.index_version,
                },
            )
        task = progress.stage(f"methods on {split}", len(roi_set.rows))
        for start in range(0, len(roi_set.rows), BATCH):
            rows = roi_set.rows[start : start + BATCH]
            rois = roi_set.rois[start : start + BATCH]
            truth = _load_truth(inputs.manifest, rows)
            answers: dict[str, MethodMaps] = {"mr": MethodMaps(fc=truth["fc"], tc=truth["tc"])}
            for name, predictor in predictors.items():
                answers[name] = predictor.predict(rois)
            if oracle is not None:
                answers["oracle"] = oracle.predict_from_truth(truth)
            results.features[split].rows.extend(rows)
            for name, answer in answers.items():
                results.features[split].add(name, answer.fc, answer.tc)
            if split == "test":
                _add_test_batch(results, rows, rois, truth, answers)
                tally.add_test(rows, truth, answers)
            elif split == "downstream" and tally.wants_calibration_knees:
                tally.add_calibration_knees(rows, truth, answers["mris-s"])
            progress.advance(task, min(len(roi_set.rows), start + BATCH))
    return results


def _served_calibration_notes(calibration, k: int) -> list[str]:
    """What the report says when the served calibration was fitted otherwise than measured."""
    data = calibration.data or {}
    notes = []
    if data.get("k") not in (None, k):
        notes.append(f"the served calibration was fitted with k = {data['k']}; measured at k = {k}")
    return notes


def _add_test_batch(
    results: MethodResults,
    rows: Sequence[ManifestRow],
    rois,
    truth: dict[str, np.ndarray],
    answers: dict[str, MethodMaps],
) -> None:
    """A test batch's errors per method and cartilage, and the maps of its example knees."""
    errors, examples = results.errors, results.examples
    errors.add_rows(rows)
    predicted = {name: answer for name, answer in answers.items() if name != "mr"}
    results.reference.add(rows, truth, predicted)
    for name, answer in answers.items():
        if name != "mr":
            for cartilage in CARTILAGES:
                errors.add(name, cartilage, answer[cartilage], truth[cartilage])
    for i, row in enumerate(rows):
        if row.pair_id in examples.pair_ids:
            examples.rows[row.pair_id] = row
            examples.roi[row.pair_id] = rois[i].image
            examples.maps[row.pair_id] = {
                name: {
                    **{c: answer[c][i] for c in CARTILAGES},
                    **{f"{c}_std": s[i] for c, s in answer.std.items()},
                }
                for name, answer in answers.items()
            }


def downstream_stage(
    request: EvaluateRequest, inputs: EvaluationInputs, results: MethodResults, progress: Progress
) -> dict[str, Any] | None:
    """Stage 8: Table 3 (classifiers trained on the downstream split's maps, tested on the test
    split's); ``None`` without downstream rows or classifiers."""
    features = results.features
    if "downstream" not in features or not features["downstream"].rows or not inputs.classifiers:
        return None
    return downstream_table(
        features["downstream"],
        features["test"],
        ["mr", *inputs.methods],
        request.resamples,
        request.seed,
        classifiers=inputs.classifiers,
        profile=request.profile,
        epochs=request.classifier_epochs,
        weights=request.classifier_weights,
        device=request.device,
        threads=request.threads,
        log=progress.log,
    )


def build_report(
    request: EvaluateRequest,
    inputs: EvaluationInputs,
    artefacts: Artefacts,
    roi_sets: dict[str, RoiSet],
    use_localiser: bool,
    results: MethodResults,
    tables: dict[str, Any],
) -> dict[str, Any]:
    """Stage 9: ``report.json``'s content (without ``seconds``)."""
    models, pipelines = artefacts.models, artefacts.pipelines
    baseline_paths, errors = artefacts.baseline_paths, results.errors
    reference, oracle = results.reference, results.oracle
    rois = {
        "source": "localiser" if use_localiser else "keypoints",
        **{
            split: {
                "pairs": len(s.rows),
                "skipped": {r: len(p) for r, p in s.skipped.items()},
                "keypoint_fallbacks": s.keypoint_fallbacks,
            }
            for split, s in roi_sets.items()
        },
    }
    artefact_paths = {
        "model": str(request.model),
        "combined_model": str(models["combined"].root) if "combined" in models else "",
        "indexes": {v: str(p) for v, p in artefacts.indexes.items()},
        "index_versions": {v: p.index_version for v, p in pipelines.items()},
        "database_rows": pipelines["separate"].index.card.rows,
        **{
            method: str(baseline_paths[method]) if method in baseline_paths else None
            for method in BASELINES
        },
        "baseline_notes": artefacts.baseline_notes,
    }
    return {
        "format": REPORT_FORMAT,
        "command": request.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": inputs.methods,
        "warnings": inputs.warnings,
        "k": request.k,
        "nan_rule": request.nan_rule,
        "bootstrap_resamples": request.resamples,
        "seed": request.seed,
        "rois": rois,
        "artefacts": artefact_paths,
        "model_card": _card_summary(inputs.model.card),
        "cohort": _cohort_stats(request.manifest),
        "table1_retrieval": tables["table1"],
        "table2_reference": tables["table2"],
        "table2_error": tables["table2_mae"],
        "uncertainty": tables.get("uncertainty"),
        "table3_downstream": tables["table3"],
        "oracle_rows": {c: len(set(v)) for c, v in (oracle.chosen.items() if oracle else [])},
        "per_knee": {
            "pair_ids": errors.pair_ids,
            "subjects": errors.subjects,
            "klg": errors.klg,
            "mae": errors.mae,
            "coverage": errors.coverage,
            "reference_median": reference.median,
            "reference_mad": reference.mad,
        },
    }


# ---------------------------------------------------------------------------------------- run
def evaluate(request: EvaluateRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Run the evaluation and write the report; returns ``report.json``'s content."""
    from mris.evaluation.report import write_report

    progress = progress or Progress()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    inputs = load_inputs(request)
    mark = time.perf_counter()
    artefacts = train_missing(request, inputs)
    seconds["train_missing"] = time.perf_counter() - mark
    mark = time.perf_counter()
    load_pipelines(request, artefacts)
    seconds["indexes"] = time.perf_counter() - mark
    mark = time.perf_counter()
    roi_sets, use_localiser = collect_roi_sets(
        request, inputs, artefacts.pipelines["separate"], progress
    )
    seconds["rois"] = time.perf_counter() - mark
    tables: dict[str, Any] = {}
    mark = time.perf_counter()
    tables["table1"] = retrieval_table(
        request,
        artefacts.pipelines,
        inputs.manifest,
        roi_sets["test"],
        inputs.model.card.preprocess_config,
    )
    seconds["table1"] = time.perf_counter() - mark
    mark = time.perf_counter()
    results = run_methods(request, inputs, artefacts, roi_sets, progress)
    seconds["methods"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tables["table2"] = reference_table(results.reference, request.resamples, request.seed)
    tables["table2_mae"] = error_table(results.errors, request.resamples, request.seed)
    seconds["tables"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tables["uncertainty"] = uncertainty_table(results.uncertainty, request.resamples, request.seed)
    seconds["uncertainty"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tables["table3"] = downstream_stage(request, inputs, results, progress)
    seconds["table3"] = time.perf_counter() - mark
    report = build_report(request, inputs, artefacts, roi_sets, use_localiser, results, tables)
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {name: round(value, 1) for name, value in seconds.items()}
    write_report(request.out, report, results.examples)
    progress.log(f"report: {request.out / 'report.md'} ({seconds['total']:.0f} s)")
    return report


def _parse_classifiers(request: EvaluateRequest) -> list[str]:
    names = (
        request.classifiers.split(",")
        if isinstance(request.classifiers, str)
        else list(request.classifiers)
    )
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in CLASSIFIERS]
    if unknown:
        raise BadParameter(
            f"--classifiers: unknown {', '.join(unknown)}; choose from {', '.join(CLASSIFIERS)}"
        )
    if "resnet18" in names:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise MrisError(
                "Table 3's ResNet-18 classifier needs torch: install the train extra "
                "(pip install 'mris[train]') or pass --classifiers logistic"
            ) from exc
    if request.classifier_weights is not None and not Path(request.classifier_weights).is_file():
        raise BadParameter(f"--classifier-weights {request.classifier_weights}: no such file")
    return names


def retrieval_table(
    request: EvaluateRequest, pipelines: dict, manifest: Manifest, test: RoiSet, config
) -> dict[str, Any]:
    """Table 1 on the test split's first visits with the bundles' ONNX encoders."""
    from mris.encoders import OnnxEncoder
    from mris.index.embed import region_inputs

    positions = first_visit_positions(test.rows)
    rows = [test.rows[i] for i in positions]
    images = np.stack([test.rois[i].image for i in positions])[:, None]
    truth = _load_truth(manifest, rows)
    subjects = [row.subject_id for row in rows]
    table: dict[str, Any] = {}
    for label, variant, region in (
        ("femoral", "separate", "fc"),
        ("tibial", "separate", "tc"),
        ("combined", "combined", "combined"),
    ):
        if variant not in pipelines:
            continue
        pipeline = pipelines[variant]
        thickness = OnnxEncoder(
            pipeline.model.encoder_path(variant, region, "thickness"),
            device=request.device,
            intra_op_threads=request.threads,
            batch_size=64,
        )
        inputs = np.stack(
            [
                region_inputs(variant, fc, tc, config)[region]
                for fc, tc in zip(truth["fc"], truth["tc"])
            ]
        )
        keys = thickness.embed(inputs[:, None])
        queries = pipeline.encoders[region].embed(images)
        table[label] = {
            "variant": variant,
            "region": region,
            **retrieval_row(queries, keys, subjects, request.resamples, request.seed),
        }
    return table


def _card_summary(card) -> dict[str, Any]:
    training = card.training or {}
    return {
        "created": card.created,
        "preprocess": card.preprocess,
        "variants": sorted(card.variants),
        "profile": (training.get("profile") or {}).get("name"),
        "epochs": (training.get("profile") or {}).get("epochs"),
        "init": training.get("init"),
        "manifest_sha256": training.get("manifest_sha256"),
        "files": card.files,
        # recall of the held-out validation subjects' first visits against chance (cards
        # written before it was measured have none)
        "validation_first_visit": {
            name: region["validation_first_visit"]
            for name, region in ((card.metrics or {}).get("regions") or {}).items()
            if isinstance(region, dict) and region.get("validation_first_visit")
        },
    }


def _cohort_stats(manifest_path: Path) -> dict[str, Any] | None:
    stats = Path(manifest_path).parent / "cohort_stats.json"
    if not stats.is_file():
        return None
    try:
        return json.loads(stats.read_text())
    except ValueError:
        return None
