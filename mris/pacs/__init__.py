"""``mris pacs``: the service's pipeline against a PACS, over DICOMweb.

- ``mris pacs run --study UID`` pulls the study's radiographs (QIDO-RS to list them, WADO-RS to
  fetch each in its stored transfer syntax), synthesizes every bilateral PA knee radiograph in
  it, and stores a Secondary Capture and a TID 1500 SR per radiograph (``mris.dicom_out``) back
  into the same study (STOW-RS).
- ``mris pacs watch`` follows new stable studies in Orthanc and does the same for each.

Modules: ``config`` (``PacsSettings``, every option from ``MRIS_PACS_*``), ``client`` (the
DICOMweb and Orthanc REST calls, every failure a typed error without a URL in it), ``router``
(one study: which instances, skip or synthesize, store), ``watch`` (the change feed, the cursor,
the dead letters), ``metrics`` (Prometheus), ``commands`` (the CLI). Nothing below this package
imports it; it calls ``mris.pipeline`` and ``mris.dicom_out`` and copies neither.

Decisions (docs/PACS.md has the user's side):

- Idempotent by UID: a result's series and SOP instance UIDs are derived from the source image's
  SOP Instance UID and the model and index versions (``mris.dicom_out.ResultUids.derived``).
  Before synthesizing a radiograph the router asks the PACS (QIDO-RS) whether both of its
  results are already in the study; if so it is skipped as "already processed". A re-run, a
  restarted watcher or two watchers never duplicate a result, and a new model or index version
  gives new results beside the old ones. The PACS is the record; nothing local decides.
- Which images: instances whose Modality is a projection radiograph (CR, DX) and whose Body
  Part Examined, when present, is a knee or leg; the rest are skipped and counted by reason
  (``SKIP_REASONS``), as are radiographs that do not decode or where the localiser does not find
  both knees. A skipped image is never an error.
- Decoding happens in ``mris.sandbox.DecodeSandbox`` (worker processes capped in memory and
  time), exactly as in the service: a PACS holds files nobody here has vetted.
- No patient identifier in a log line or a message: studies are named by ``study_ref`` (the
  first 12 hex digits of the SHA-256 of the Study Instance UID), errors by type and HTTP status
  (never the URL, which holds UIDs), and dicomweb-client's and urllib3's loggers (which log UIDs
  and URLs) are held at WARNING. The watcher's state folder (cursor and dead letters) does hold
  Study Instance UIDs, as it must to retry them: keep it as private as the PACS.
"""
