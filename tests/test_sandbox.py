"""mris.sandbox: decoding in memory- and time-bounded worker processes.

The containment tests turn the codestream checks off (``DecodeLimits(check_codestreams=False)``)
so that the 0-line JPEG-LS file really reaches its decoder, which then allocates without bound:
the sandbox must turn that into a typed error within its deadline while this process's memory
stays where it was.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom, make_dicom_bytes

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from mutations import hostile_files
from serve_process import alive, rss_mb

from mris.dicom import DecodeLimits, Radiograph
from mris.errors import (
    DecoderCrashed,
    DecodeTimeout,
    ImageTooLarge,
    NoUsableSpacing,
    UnreadableDicom,
)
from mris.sandbox import DecodeSandbox, worker_pids

UNCHECKED = DecodeLimits(min_side_px=8, check_codestreams=False)


@pytest.fixture(scope="module")
def sandbox():
    with DecodeSandbox(workers=1, memory_mb=768, timeout_s=8) as box:
        yield box


def test_a_good_file_decodes_as_in_process(sandbox):
    image = knee_phantom()
    radiograph = sandbox.read(make_dicom_bytes(image, bits_stored=12))
    assert isinstance(radiograph, Radiograph)
    np.testing.assert_array_equal(radiograph.pixels, image.astype(np.float32))
    assert radiograph.spacing_source == "ImagerPixelSpacing"


def test_typed_errors_pass_through(sandbox):
    with pytest.raises(NoUsableSpacing):
        sandbox.read(make_dicom_bytes(knee_phantom(), imager_spacing=None))
    with pytest.raises(UnreadableDicom, match="0 lines"):
        sandbox.read(
            hostile_files()["jpeg-ls-sof55-zero-lines"], limits=DecodeLimits(min_side_px=8)
        )


@pytest.mark.parametrize("name", ["jpeg-ls-sof55-zero-lines", "jpeg-extended-sof1-zero-lines"])
def test_a_runaway_decoder_is_contained(sandbox, name):
    before = rss_mb(os.getpid())
    pids = worker_pids(sandbox)
    started = time.monotonic()
    with pytest.raises((DecoderCrashed, ImageTooLarge, UnreadableDicom, DecodeTimeout)) as caught:
        sandbox.read(hostile_files()[name], spacing_mm=0.2, limits=UNCHECKED)
    elapsed = time.monotonic() - started
    assert elapsed < sandbox.timeout_s + 3, "the deadline bounds the decode"
    assert rss_mb(os.getpid()) - before < 50, (
        "the runaway allocation happened in a worker, not here"
    )
    assert "Secret" not in caught.value.detail
    # The pool replaced a worker that died, and still decodes.
    assert sandbox.read(make_dicom_bytes(knee_phantom(), bits_stored=12)).shape == (96, 128)
    if isinstance(caught.value, (DecoderCrashed, DecodeTimeout)):
        assert not any(alive(pid) for pid in pids)


def test_the_deadline_kills_a_slow_decode():
    # Without the memory cap the 0-line JPEG-LS decoder grows until the deadline kills it.
    with DecodeSandbox(workers=1, memory_mb=16384, timeout_s=1.0) as box:
        pids = worker_pids(box)
        started = time.monotonic()
        with pytest.raises(DecodeTimeout, match="longer than 1 s"):
            box.read(hostile_files()["jpeg-ls-sof55-zero-lines"], spacing_mm=0.2, limits=UNCHECKED)
        assert time.monotonic() - started < 4.0
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids), "the overrunning worker was killed"
        assert box.read(make_dicom_bytes(knee_phantom(), bits_stored=12)).shape == (96, 128)


def test_close_kills_workers_at_once():
    box = DecodeSandbox(workers=2, memory_mb=16384, timeout_s=30).start()
    pids = worker_pids(box)
    assert len(pids) == 2
    future = box.submit(hostile_files()["jpeg-ls-sof55-zero-lines"], 0.2, UNCHECKED)
    time.sleep(0.3)  # the decoder is running away now
    started = time.monotonic()
    box.close()
    assert time.monotonic() - started < 5
    assert not any(alive(pid) for pid in pids)
    assert future.done()
