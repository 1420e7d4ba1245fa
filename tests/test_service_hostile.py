"""Hostile HTTP input against the service (issue 12): every case is a 4xx problem+json with a
detail that names what was wrong, never a 5xx, and the server keeps serving.

The server is uvicorn on 127.0.0.1 (test_service's ``RunningServer``) over the tiny real bundle;
requests are built by hand where a client library would refuse to send them (non-ASCII header
bytes, repeated parameters, odd multipart bodies, raw sockets for Content-Length).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from conftest import knee_phantom, make_dicom_bytes
from serve_process import tiny_bundle
from test_service import KEYPOINTS, TOKEN, RunningServer, _free_port

from mris.errors import BadParameter
from mris.pipeline import MAX_K, RequestOptions

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD_KEYPOINTS = json.dumps(KEYPOINTS)
BOUNDARY = "hostile-boundary"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def server(bundle):
    from mris.service.config import Settings

    model, index = bundle
    settings = Settings(
        model_dir=model,
        index_root=index,
        port=_free_port(),
        api_token=TOKEN,
        intra_op_threads=1,
        max_upload_mb=1.0,
        request_timeout_s=20,
    )
    with RunningServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def dicom() -> bytes:
    return make_dicom_bytes(knee_phantom(), imager_spacing=(0.2, 0.2))


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["detail"].strip() and problem["title"].strip()
    for word in words:
        assert word in problem["detail"], problem["detail"]
    return problem


def multipart(*parts: tuple[bytes, bytes | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body from (name, filename or None, value) parts, bytes as given."""
    body = b""
    for name, filename, value in parts:
        body += (
            b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="' + name + b'"'
        )
        if filename is not None:
            body += b'; filename="' + filename + b'"\r\nContent-Type: application/dicom'
        body += b"\r\n\r\n" + value + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n"


def post_form(server, parts, route="/synthesize", headers=None, params=None) -> httpx.Response:
    headers = {
        **AUTH,
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        **(headers or {}),
    }
    return httpx.post(
        f"{server.url}{route}",
        content=multipart(*parts),
        headers=headers,
        params=params,
        timeout=30,
    )


def raw_http(server, request: bytes) -> bytes:
    """Send raw bytes; return what came back before the server closed (or 5 s passed)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


# ------------------------------------------------------------------------------ the token
BAD_AUTHORIZATION = {
    "utf-8 e-acute": b"Bearer \xc3\xa9",
    "latin-1 e-acute": b"Bearer \xe9",
    "high bytes": b"Bearer \xff\xfe\x80\x81",
    "token plus utf-8": b"Bearer " + TOKEN.encode() + b"\xc3\xa9",
    "scheme only": b"Bearer",
    "lower-case scheme, wrong token": b"bearer wrong",
    "basic": b"Basic " + TOKEN.encode(),
    "long": b"Bearer " + b"\xe9" * 4000,
}


@pytest.mark.parametrize(
    "route", ["/synthesize", "/retrieve", "/info", "/metrics", "/admin/reload"]
)
def test_any_authorization_bytes_give_401(server, dicom, route):
    method = "GET" if route in ("/info", "/metrics") else "POST"
    with httpx.Client(timeout=30) as client:
        for case, value in BAD_AUTHORIZATION.items():
            response = client.request(
                method,
                f"{server.url}{route}",
                content=dicom if method == "POST" else None,
                headers=[(b"Authorization", value), (b"Content-Type", b"application/dicom")],
            )
            assert_problem(response, 401, "bearer token")
            assert response.headers["www-authenticate"] == "Bearer", case


def test_a_non_ascii_token_is_compared_as_utf8_bytes(bundle):
    from mris.service.config import Settings

    token = "tökén-λ"
    model, index = bundle
    settings = Settings(
        model_dir=model, index_root=index, port=_free_port(), api_token=token, intra_op_threads=1
    )
    with RunningServer(settings) as running:
        ok = httpx.get(
            f"{running.url}/info", headers=[(b"Authorization", b"Bearer " + token.encode("utf-8"))]
        )
        assert ok.status_code == 200, ok.text
        latin1 = "tökén".encode("latin-1")  # the same letters as other bytes
        assert_problem(
            httpx.get(f"{running.url}/info", headers=[(b"Authorization", b"Bearer " + latin1)]), 401
        )


# ---------------------------------------------------------------------------- the options
HOSTILE_OPTIONS = {
    # name: (options, field the detail names)
    "keypoints nested brackets, 2 k": ({"keypoints": "[" * 2000}, "keypoints"),
    "keypoints nested brackets, 300 KB": ({"keypoints": "[" * 300_000}, "keypoints"),
    "keypoints nested brackets within the length limit": ({"keypoints": "[" * 250}, "keypoints"),
    "keypoints huge int": (
        {"keypoints": '{"left": [100000000000000000000000000000, 5]}'},
        "keypoints",
    ),
    "keypoints int past float range": (
        {"keypoints": '{"left": [1' + "0" * 400 + ", 5]}"},
        "keypoints",
    ),
    "keypoints 1e400": ({"keypoints": '{"left": [1e400, 5], "right": [1, 2]}'}, "keypoints"),
    "keypoints NaN": ({"keypoints": '{"left": [NaN, 5]}'}, "keypoints"),
    "keypoints Infinity": ({"keypoints": '{"left": [-Infinity, 5]}'}, "keypoints"),
    "keypoints nested objects": ({"keypoints": '{"left": {"x": {"y": [1, 2]}}}'}, "keypoints"),
    "keypoints nested lists": ({"keypoints": '{"right": [[1], [2]]}'}, "keypoints"),
    "keypoints booleans": ({"keypoints": '{"right": [true, false]}'}, "keypoints"),
    "keypoints a knee twice": ({"keypoints": '{"left": [80, 40], "LEFT": [81, 40]}'}, "keypoints"),
    "keypoints beyond 1e6 px": ({"keypoints": '{"left": [2000000, 40]}'}, "keypoints"),
    "keypoints a list": ({"keypoints": "[1, 2]"}, "keypoints"),
    "spacing 3 mm": ({"spacing_mm": "3"}, "spacing_mm"),
    "spacing 0.01 mm": ({"spacing_mm": "0.01"}, "spacing_mm"),
    "spacing nan": ({"spacing_mm": "nan"}, "spacing_mm"),
    "spacing inf": ({"spacing_mm": "inf"}, "spacing_mm"),
    "spacing -Infinity": ({"spacing_mm": "-Infinity"}, "spacing_mm"),
    "spacing 1e400": ({"spacing_mm": "1e400"}, "spacing_mm"),
    "spacing too long": ({"spacing_mm": "0." + "1" * 100}, "spacing_mm"),
    "k 0": ({"k": "0"}, "k"),
    "k above MAX_K": ({"k": str(MAX_K + 1)}, "k"),
    "k 1e2": ({"k": "1e2"}, "k"),
    "k nan": ({"k": "nan"}, "k"),
    "k 40 digits": ({"k": "9" * 40}, "k"),
    "k 5000 digits": ({"k": "1" * 5000}, "k"),
    "knees long": ({"knees": "x" * 100}, "knees"),
    "knees unknown": ({"knees": "middle"}, "knees"),
    "format unknown": ({"format": "xml"}, "format"),
    "nan_rule unknown": ({"nan_rule": "any"}, "nan_rule"),
    "nan_rule upper case": ({"nan_rule": "ALL"}, "nan_rule"),
    "nan_rule too long": ({"nan_rule": "a" * 100}, "nan_rule"),
    "unknown option": ({"spacing": "0.2"}, "spacing"),
}


# A query string longer than uvicorn's request-line limit never reaches the app; those cases
# travel as form fields only.
OPTION_CASES = [
    (case, where)
    for case in sorted(HOSTILE_OPTIONS)
    for where in ("form", "query")
    if where == "form" or all(len(v) < 6000 for v in HOSTILE_OPTIONS[case][0].values())
]


@pytest.mark.parametrize("case, where", OPTION_CASES)
def test_hostile_options_give_422_naming_the_field(server, dicom, case, where):
    options, field = HOSTILE_OPTIONS[case]
    if where == "form":
        parts = [(b"file", b"x.dcm", dicom)] + [
            (k.encode(), None, v.encode()) for k, v in options.items()
        ]
        response = post_form(server, parts)
    else:
        response = httpx.post(
            f"{server.url}/retrieve",
            content=dicom,
            params=options,
            headers={**AUTH, "Content-Type": "application/dicom"},
            timeout=30,
        )
    assert_problem(response, 422, field)


def test_repeated_options_are_refused(server, dicom):
    response = httpx.post(
        f"{server.url}/synthesize?k=3&k=5",
        content=dicom,
        headers={**AUTH, "Content-Type": "application/dicom"},
    )
    assert_problem(response, 422, "k", "more than once")
    parts = [(b"file", b"x.dcm", dicom), (b"knees", None, b"left"), (b"knees", None, b"right")]
    assert_problem(post_form(server, parts), 422, "knees", "more than once")


def test_an_invalid_query_option_is_refused_even_when_the_form_overrides_it(server, dicom):
    parts = [
        (b"file", b"x.dcm", dicom),
        (b"keypoints", None, GOOD_KEYPOINTS.encode()),
        (b"k", None, b"3"),
    ]
    assert_problem(post_form(server, parts, params={"k": "0"}), 422, "k")
    assert post_form(server, parts, params={"k": "7"}).json()["k"] == 3  # a form field wins


def test_non_utf8_bytes_in_options(server, dicom):
    parts = [(b"file", b"x.dcm", dicom), (b"k", None, b"\xff\xfe")]
    assert_problem(post_form(server, parts), 422, "k")
    parts = [(b"file", b"x.dcm", dicom), (b"keypoints", None, b'{"left": [\xff, 1]}')]
    assert_problem(post_form(server, parts), 422, "keypoints")
    parts = [(b"file", b"x.dcm", dicom), (b"\xff\xfe", None, b"1")]
    assert_problem(post_form(server, parts), 422, "unknown form field")
    response = httpx.post(
        f"{server.url}/synthesize?k=%FF%FE&keypoints=%C3",
        content=dicom,
        headers={**AUTH, "Content-Type": "application/dicom"},
    )
    assert_problem(response, 422)


def test_parse_keypoints_any_text_is_bad_parameter_or_centres(monkeypatch):
    from mris import roi

    assert roi.parse_keypoints('{"left": [80.5, 40], "right": [-3, 1e6]}') == {
        "LEFT": (80.5, 40.0),
        "RIGHT": (-3.0, 1e6),
    }
    monkeypatch.setattr(roi, "KEYPOINTS_MAX_CHARS", 1_000_000)  # reach the parser's own guards
    for text in (
        "[" * 100_000,
        '{"left": [1' + "0" * 400 + ", 1]}",
        '{"left": [1' + "0" * 5000 + ", 1]}",
        '{"left": [1e400, 1]}',
        '{"left": [NaN, 1]}',
        "{" * 50_000,
    ):
        with pytest.raises(BadParameter):
            roi.parse_keypoints(text)


@pytest.mark.parametrize(
    "options",
    [
        {"k": float("inf")},
        {"k": float("nan")},
        {"k": "1" * 5000},
        {"k": True},
        {"knees": ["both"]},
        {"spacing_mm": "nan"},
        {"spacing_mm": float("inf")},
        {"spacing_mm": "3"},
        {"keypoints": "[" * 5000},
        {"nan_rule": "any"},
        {"nan_rule": None},
        {"nan_rule": "a" * 5000},
    ],
)
def test_request_options_from_strings_refuses_with_bad_parameter(options):
    with pytest.raises(BadParameter):
        RequestOptions.from_strings(**options)


def test_request_options_carry_the_nan_rule():
    from mris.synthesis import DEFAULT_NAN_RULE, NAN_RULES

    assert RequestOptions.from_strings().nan_rule == DEFAULT_NAN_RULE == RequestOptions().nan_rule
    for rule in NAN_RULES:
        assert RequestOptions.from_strings(nan_rule=rule).nan_rule == rule


# ------------------------------------------------------------------- multipart and headers
def test_multipart_edge_cases(server, dicom):
    file_part = (b"file", b"x.dcm", dicom)
    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    empty = httpx.post(
        f"{server.url}/synthesize", content=f"--{BOUNDARY}--\r\n".encode(), headers=headers
    )
    assert_problem(empty, 422, "file")
    no_boundary = httpx.post(
        f"{server.url}/synthesize",
        content=b"--x\r\n\r\n",
        headers={**AUTH, "Content-Type": "multipart/form-data"},
    )
    assert_problem(no_boundary, 400, "boundary")
    many = [file_part] + [(b"f%d" % i, None, b"1") for i in range(40)]
    assert_problem(post_form(server, many), 400, "Too many fields")
    assert_problem(post_form(server, [file_part, file_part]), 400, "Too many files")
    assert_problem(post_form(server, [(b"file", None, b"a string")]), 422, "file")
    assert_problem(
        post_form(server, [(b"keypoints", b"k.json", GOOD_KEYPOINTS.encode())]), 422, "keypoints"
    )
    big_field = [file_part, (b"keypoints", None, b"[" * (2 << 20))]
    assert_problem(post_form(server, big_field), 413)  # over the 1 MiB upload limit
    garbage = httpx.post(f"{server.url}/synthesize", content=b"\x00\xff" * 500, headers=headers)
    assert garbage.status_code in (400, 422) and garbage.json()["detail"]


@pytest.mark.parametrize(
    "content_type, status",
    [
        ("application/dicom; charset=utf-8", 200),
        ("Application/DICOM", 200),
        ("application/octet-stream; x=1", 200),
        ("text/plain", 415),
        ("", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=", 400),
        ("multipart/mixed; boundary=x", 415),
    ],
)
def test_odd_content_types(server, dicom, content_type, status):
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    response = httpx.post(
        f"{server.url}/retrieve",
        content=dicom,
        params={"keypoints": GOOD_KEYPOINTS},
        headers=headers,
        timeout=30,
    )
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_problem(response, status)


def test_upper_case_multipart_type(server, dicom):
    parts = [(b"file", b"x.dcm", dicom), (b"keypoints", None, GOOD_KEYPOINTS.encode())]
    response = httpx.post(
        f"{server.url}/retrieve",
        content=multipart(*parts),
        headers={**AUTH, "Content-Type": f"MULTIPART/Form-Data; boundary={BOUNDARY}"},
    )
    assert response.status_code == 200, response.text


def test_non_ascii_content_type_is_415(server, dicom):
    response = httpx.post(
        f"{server.url}/retrieve",
        content=dicom,
        headers=[
            (b"Authorization", f"Bearer {TOKEN}".encode()),
            (b"Content-Type", b"text/\xe9\xff"),
        ],
    )
    assert_problem(response, 415)


REQUEST = (
    b"POST /synthesize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b"\r\nContent-Type: application/dicom\r\nConnection: close\r\n"
)


def test_huge_content_length_is_413_before_reading(server):
    answer = raw_http(server, REQUEST + b"Content-Length: 99999999999999999999\r\n\r\nabc")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/problem+json" in head
    assert json.loads(body)["detail"]


def test_malformed_framing_is_refused_by_uvicorn_and_the_server_stays_up(server):
    # Refused by uvicorn's HTTP parser (h11) before the app sees a request: a plain-text 400,
    # not problem+json; no app code runs, so the app cannot shape that answer.
    for framing in (
        b"Content-Length: abc\r\n\r\nabc",
        b"Content-Length: -5\r\n\r\n",
        b"Content-Length: 999999999999999999999999\r\n\r\n",
    ):
        assert raw_http(server, REQUEST + framing).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_openapi_states_the_enforced_limits(server):
    from mris.dicom import SPACING_MAX_MM, SPACING_MIN_MM
    from mris.roi import KEYPOINTS_MAX_CHARS
    from mris.synthesis import DEFAULT_NAN_RULE, NAN_RULES

    document = httpx.get(f"{server.url}/openapi.json").json()
    for route in ("/synthesize", "/retrieve"):
        operation = document["paths"][route]["post"]
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        query = {p["name"]: p["schema"] for p in operation["parameters"]}
        for fields in (form, query):
            assert (fields["k"]["minimum"], fields["k"]["maximum"]) == (1, MAX_K)
            assert (fields["spacing_mm"]["minimum"], fields["spacing_mm"]["maximum"]) == (
                SPACING_MIN_MM,
                SPACING_MAX_MM,
            )
            assert fields["keypoints"]["maxLength"] == KEYPOINTS_MAX_CHARS
            assert tuple(fields["nan_rule"]["enum"]) == NAN_RULES
            assert fields["nan_rule"]["default"] == DEFAULT_NAN_RULE
        for status in ("400", "401", "413", "415", "422", "503"):
            problem = operation["responses"][status]["content"]["application/problem+json"][
                "schema"
            ]
            assert problem["properties"]["detail"]["minLength"] == 1
    assert set(document["paths"]["/synthesize"]["post"]["responses"]["200"]["content"]) == {
        "application/json",
        "application/x-npz",
        "image/png",
        "application/zip",
    }
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain"
    }
