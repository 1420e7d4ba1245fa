"""mris.options: the one request-options model. Its limits are the decoder's, the service's
OpenAPI document is generated from it, and the CLI and the service refuse the same values
naming the same option."""

from __future__ import annotations

import math

import pytest
from conftest import require
from typer.testing import CliRunner

from mris.cli import app as cli_app
from mris.dicom import SPACING_MAX_MM, SPACING_MIN_MM, validate_spacing_mm
from mris.errors import BadParameter
from mris.options import (
    MAX_K,
    OPTION_NAMES,
    RequestOptions,
    SynthesisOptions,
    option_text_limit,
)
from mris.roi import KEYPOINTS_MAX_CHARS
from mris.synthesis import DEFAULT_NAN_RULE, NAN_RULES

KEYPOINTS = '{"right": [38.4, 48.0], "left": [89.6, 48.0]}'


def _accepted_by_decoder(value: object) -> bool:
    try:
        validate_spacing_mm(value)
    except BadParameter:
        return False
    return True


def _accepted_by_model(value: object) -> bool:
    try:
        SynthesisOptions.parse(spacing_mm=value)
    except BadParameter:
        return False
    return True


SPACINGS = [
    SPACING_MIN_MM,
    SPACING_MAX_MM,
    math.nextafter(SPACING_MIN_MM, 0),
    math.nextafter(SPACING_MAX_MM, math.inf),
    math.nextafter(SPACING_MIN_MM, 1),
    math.nextafter(SPACING_MAX_MM, 0),
    0.0,
    -0.2,
    0.2,
    1.1,
    3.0,
    5.0,
    math.nan,
    math.inf,
    -math.inf,
    "0.2",
    "2",
    "2.0000001",
    "0.05",
    "0.0499",
    "nan",
    "1e400",
]


@pytest.mark.parametrize("spacing_mm", SPACINGS, ids=repr)
def test_spacing_limits_are_the_decoders(spacing_mm):
    assert _accepted_by_model(spacing_mm) == _accepted_by_decoder(spacing_mm)


def test_the_model_states_its_owners_limits():
    properties = SynthesisOptions.model_json_schema()["properties"]
    spacing = next(b for b in properties["spacing_mm"]["anyOf"] if b.get("type") == "number")
    assert (spacing["minimum"], spacing["maximum"]) == (SPACING_MIN_MM, SPACING_MAX_MM)
    assert (properties["k"]["minimum"], properties["k"]["maximum"]) == (1, MAX_K)
    keypoints = next(b for b in properties["keypoints"]["anyOf"] if b.get("type") == "string")
    assert keypoints["maxLength"] == KEYPOINTS_MAX_CHARS == option_text_limit("keypoints")
    assert tuple(properties["nan_rule"]["enum"]) == NAN_RULES
    assert properties["nan_rule"]["default"] == DEFAULT_NAN_RULE


def test_parse_gives_the_pipelines_options():
    options = SynthesisOptions.parse(
        knees="left", k="7", keypoints=KEYPOINTS, spacing_mm="0.2", nan_rule="all", format="npz"
    )
    assert options.format == "npz"
    assert options.request_options() == RequestOptions(
        knees=("LEFT",),
        k=7,
        keypoints={"RIGHT": (38.4, 48.0), "LEFT": (89.6, 48.0)},
        spacing_mm=0.2,
        nan_rule="all",
    )
    assert SynthesisOptions.parse(keypoints="", spacing_mm="").request_options() == RequestOptions()
    assert RequestOptions.from_strings(k="3").k == 3  # the old spelling keeps working


def test_parse_refuses_any_value_with_bad_parameter_only():
    hypothesis = require("hypothesis")
    st = hypothesis.strategies
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=300),
        st.text(alphabet="0123456789.e-+naif", max_size=40),
        st.lists(st.integers(), max_size=3),
        st.binary(max_size=10),
    )

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.dictionaries(st.sampled_from(OPTION_NAMES), values))
    def check(given):
        try:
            SynthesisOptions.parse(**given)
        except BadParameter as exc:
            assert exc.detail.split(":")[0].split(" ")[0] in OPTION_NAMES

    check()


# ------------------------------------------------------------------ the service's OpenAPI body
@pytest.fixture(scope="module")
def service_app(tmp_path_factory):
    from mris.service.app import create_app
    from mris.service.config import Settings

    root = tmp_path_factory.mktemp("options")
    # Never started (no lifespan): the options are refused before the served state is asked for.
    return create_app(Settings(model_dir=root / "model", index_root=root / "index"))


def _as_sent(schema: dict) -> dict:
    """A model property as an option is sent: no null branch, no title."""
    schema = dict(schema)
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if branches:
        schema.update(branches[0])
    schema.pop("title", None)
    if schema.get("default", 0) is None:
        schema.pop("default")
    return schema


@pytest.mark.parametrize("route", ["/synthesize", "/retrieve"])
def test_openapi_body_is_the_models_schema(service_app, route):
    operation = service_app.openapi()["paths"][route]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    properties = dict(form["properties"])
    assert properties.pop("file")["format"] == "binary"
    assert form["required"] == ["file"] and form["additionalProperties"] is False
    model = {
        name: _as_sent(schema)
        for name, schema in SynthesisOptions.model_json_schema()["properties"].items()
    }
    model["k"].pop("default")  # the service's MRIS_DEFAULT_K, not the model's
    assert properties == model
    query = {
        p["name"]: {**p["schema"], "description": p["description"]} for p in operation["parameters"]
    }
    assert query == model


# ------------------------------------------------------------- CLI and service refuse alike
def _service_detail(service_app, **fields: str) -> str:
    from fastapi.testclient import TestClient

    client = TestClient(service_app)  # no context manager: the lifespan (bundle load) never runs
    response = client.post(
        "/retrieve", files={"file": ("x.dcm", b"DICM", "application/dicom")}, data=fields
    )
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def _cli_error(*args: str) -> BadParameter:
    result = CliRunner().invoke(cli_app, list(args))
    assert isinstance(result.exception, BadParameter), result.output
    return result.exception


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("spacing_mm", ["5", "0.01", "nan", "1e400", "x" * 40])
def test_cli_and_service_refuse_a_spacing_alike(service_app, tmp_path, spacing_mm):
    detail = _service_detail(service_app, keypoints=KEYPOINTS, spacing_mm=spacing_mm)
    assert detail.startswith("spacing_mm: ")
    if _is_float(spacing_mm):  # else typer refuses it as no number, before mris sees it
        error = _cli_error(
            "roi", str(tmp_path / "x.dcm"), "--keypoints", KEYPOINTS, "--spacing-mm", spacing_mm
        )
        assert error.detail == detail


@pytest.mark.parametrize(
    "option, value, flag",
    [
        ("nan_rule", "any", "--nan-rule"),
        ("nan_rule", "ALL", "--nan-rule"),
        ("k", "0", "--k"),
        ("k", str(MAX_K + 1), "--k"),
    ],
)
def test_cli_and_service_refuse_evaluate_options_alike(service_app, tmp_path, option, value, flag):
    detail = _service_detail(service_app, keypoints=KEYPOINTS, **{option: value})
    assert detail.startswith(f"{option}: ")
    args = [
        "evaluate",
        "--manifest",
        str(tmp_path / "m.csv"),
        "--model",
        str(tmp_path),
        "--index",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        flag,
        value,
    ]
    result = CliRunner().invoke(cli_app, args)
    if option == "k":  # typer's own range check, with the model's bound
        assert result.exit_code == 2 and "--k" in result.output, result.output
        from mris.evaluation.run import EvaluateRequest, evaluate

        with pytest.raises(BadParameter) as refused:
            evaluate(
                EvaluateRequest(
                    manifest=tmp_path / "m.csv",
                    model=tmp_path,
                    index=tmp_path,
                    out=tmp_path / "out",
                    k=int(value),
                )
            )
        assert refused.value.detail == detail
    else:
        assert isinstance(result.exception, BadParameter), result.output
        assert result.exception.detail == detail
