"""The request options: one pydantic model, ``SynthesisOptions``, is the boundary of every caller
that chooses how a radiograph is synthesized (the service's form fields and query parameters,
the CLI's flags, the evaluation's request), and the service's OpenAPI document is generated from
its JSON schema. ``RequestOptions`` is what the pipeline reads: the same choices, parsed.

Decisions:

- The limits come from their owners, so the model cannot disagree with the code that uses the
  value: the spacing range from ``mris.dicom`` (``validate_spacing_mm``), the keypoints' text
  bound and parser from ``mris.roi``, the NaN rules and their default from ``mris.synthesis``.
  ``MAX_K`` is owned here (the service's ``MRIS_DEFAULT_K`` and ``mris evaluate --k`` use it).
- ``SynthesisOptions.parse`` takes caller texts and gives the options or ``BadParameter`` naming
  the option, never another exception: a text longer than its limit (``option_text_limit``) is
  refused before it is parsed, numbers must be finite and in range, ``k`` a whole number (not a
  boolean), ``keypoints`` valid JSON (``mris.roi.parse_keypoints``). An empty or absent
  ``keypoints`` / ``spacing_mm`` means "not given".
- Unknown options are refused (``extra="forbid"``): a misspelt ``spacing=0.2`` silently ignored
  would change the answer without telling the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mris.dicom import SPACING_MAX_MM, SPACING_MIN_MM
from mris.errors import BadParameter
from mris.roi import KEYPOINTS_MAX_CHARS, parse_keypoints
from mris.synthesis import DEFAULT_NAN_RULE, NAN_RULES, NanRule

KNEE_CHOICES = {"both": ("RIGHT", "LEFT"), "right": ("RIGHT",), "left": ("LEFT",)}
KNEES = tuple(KNEE_CHOICES)
FORMATS = ("json", "npz", "png", "dicom")
MAX_K = 100
DEFAULT_K = 20
OPTION_MAX_CHARS = 32
"""Longest text of a scalar option (knees, k, spacing_mm, nan_rule, format) read from a caller;
longer texts are refused unparsed. ``keypoints`` has its own bound,
``mris.roi.KEYPOINTS_MAX_CHARS``."""


@dataclass(frozen=True)
class RequestOptions:
    """What a caller may choose: which knees, how many neighbours, where the joints are, a
    spacing for files without a usable one, and the NaN rule of the synthesis
    (``mris.synthesis.NAN_RULES``)."""

    knees: tuple[str, ...] = ("RIGHT", "LEFT")
    k: int = DEFAULT_K
    keypoints: dict[str, tuple[float, float]] | None = None
    spacing_mm: float | None = None
    nan_rule: NanRule = DEFAULT_NAN_RULE

    @classmethod
    def from_strings(
        cls,
        knees: Any = "both",
        k: Any = DEFAULT_K,
        keypoints: Any = None,
        spacing_mm: Any = None,
        nan_rule: Any = DEFAULT_NAN_RULE,
    ) -> RequestOptions:
        """Options as a caller types them: ``SynthesisOptions.parse`` (``BadParameter`` or
        options, never another exception), then parsed."""
        options = SynthesisOptions.parse(
            knees=knees, k=k, keypoints=keypoints, spacing_mm=spacing_mm, nan_rule=nan_rule
        )
        return options.request_options()


class SynthesisOptions(BaseModel):
    """Options of /synthesize and /retrieve (form fields with multipart, or query parameters),
    of the CLI and of the evaluation. ``format`` only shapes the service's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knees: Literal[KNEES] = Field(  # type: ignore[valid-type]
        "both", description="Which knees: both, left or right."
    )
    k: int = Field(
        DEFAULT_K,  # the service fills in its MRIS_DEFAULT_K when the caller gives none
        ge=1,
        le=MAX_K,
        description=f"Neighbours per knee and region, 1..{MAX_K} "
        "(default: the service's MRIS_DEFAULT_K).",
    )
    keypoints: str | None = Field(
        None,
        max_length=KEYPOINTS_MAX_CHARS,
        description='JSON {"left": [x, y], "right": [x, y]}: pixel column/row of the joint '
        "centres; `right` is the patient's right knee, on the image's left.",
        examples=['{"right": [812, 1180], "left": [2010, 1175]}'],
    )
    spacing_mm: float | None = Field(
        None,
        ge=SPACING_MIN_MM,
        le=SPACING_MAX_MM,
        allow_inf_nan=False,
        description="Pixel spacing (mm) for files with no usable spacing tag.",
    )
    nan_rule: Literal[NAN_RULES] = Field(  # type: ignore[valid-type]
        DEFAULT_NAN_RULE,
        description="Which pixels of /synthesize's maps are cartilage: `all` (the paper's "
        "reference: where every one of the k neighbours has cartilage) or `majority` (where "
        "neighbours with cartilage carry at least half the weight).",
    )
    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        "json",
        description="Answer of /synthesize: json, npz, png or dicom (a zip of a Secondary "
        "Capture and a TID 1500 Structured Report in the source's study).",
    )

    @field_validator("k", mode="before")
    @classmethod
    def _no_boolean_k(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic's lax mode would read True as 1
            raise ValueError("must be a whole number, not a boolean")
        return value

    @classmethod
    def parse(
        cls,
        knees: Any = "both",
        k: Any = DEFAULT_K,
        keypoints: Any = None,
        spacing_mm: Any = None,
        nan_rule: Any = DEFAULT_NAN_RULE,
        format: Any = "json",
    ) -> SynthesisOptions:
        """Options from caller texts (form fields, query parameters, CLI flags) or values.

        Gives the options or ``BadParameter`` naming the option, never another exception (see
        the module's decisions).
        """
        given = {
            "knees": knees,
            "k": k,
            "keypoints": keypoints,
            "spacing_mm": spacing_mm,
            "nan_rule": nan_rule,
            "format": format,
        }
        for name in ("keypoints", "spacing_mm"):
            if given[name] == "":
                given[name] = None  # HTML forms send blank fields
        for name, value in given.items():
            check_option_text(name, value)
        try:
            options = cls.model_validate(given)
        except ValidationError as exc:
            raise BadParameter(describe_errors(exc)) from None
        options.request_options()  # keypoints: JSON, finite, each knee once (BadParameter)
        return options

    def request_options(self) -> RequestOptions:
        """The pipeline's form of these options (knees as sides, keypoints parsed)."""
        return RequestOptions(
            knees=KNEE_CHOICES[self.knees],
            k=self.k,
            keypoints=parse_keypoints(self.keypoints),
            spacing_mm=self.spacing_mm,
            nan_rule=self.nan_rule,
        )


OPTION_NAMES = tuple(SynthesisOptions.model_fields)


def option_text_limit(name: str) -> int:
    """Most characters the text of option ``name`` may have (checked before it is parsed)."""
    return KEYPOINTS_MAX_CHARS if name == "keypoints" else OPTION_MAX_CHARS


def check_option_text(name: str, value: Any) -> None:
    """``BadParameter`` when ``value`` is a text longer than option ``name``'s limit."""
    limit = option_text_limit(name)
    if isinstance(value, str) and len(value) > limit:
        raise BadParameter(f"{name}: at most {limit} characters, got {len(value)}")


def describe_errors(exc: ValidationError) -> str:
    """One detail naming each option that was refused (``name: reason; ...``), without the
    values (they may be long or hostile)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    )


__all__ = [
    "DEFAULT_K",
    "FORMATS",
    "KNEES",
    "KNEE_CHOICES",
    "MAX_K",
    "OPTION_MAX_CHARS",
    "OPTION_NAMES",
    "RequestOptions",
    "SynthesisOptions",
    "check_option_text",
    "describe_errors",
    "option_text_limit",
]
