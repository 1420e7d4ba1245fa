"""Index bundles: embed thickness maps with the ONNX thickness encoder, choose and build FAISS
inner-product indexes, verify and publish immutable versions (installed as ``mris.index``).

One module per decision, as in autofaiss (STYLE.md):

- ``embed``   — manifest rows -> thickness maps -> encoder inputs -> embeddings (thread pool)
- ``choose``  — index kind and parameters from the size and a memory budget
- ``build``   — FAISS indexes and whole bundles (``build_index_bundle``, as named stages)
- ``verify``  — checksums, counts, encoder match, self-retrieval, recall vs exact
- ``publish`` — versions, the atomic ``current`` flip, list, gc
- ``card``    — the bundle's card and file layout (``IndexCard``, ``read_card``,
  ``check_encoders``)
- ``rows``    — ``rows.csv``: which pair each row id is (``RowMeta``, ``RowsTable``)
- ``maps``    — the maps arrays: ``MapsWriter`` at build time, ``MapStore`` at search time
- ``faiss_io``— reading and writing FAISS indexes, the GPU copy when a GPU is present
- ``bundle``  — ``load_index_bundle`` / ``IndexBundle``: the pieces above composed for search
- ``commands``— ``mris index build|verify|list|gc``

Nothing here imports torch. See docs/INDEX.md.
"""

from mris.index.bundle import IndexBundle, IndexCard, check_encoders, load_index_bundle

__all__ = ["IndexBundle", "IndexCard", "check_encoders", "load_index_bundle"]
