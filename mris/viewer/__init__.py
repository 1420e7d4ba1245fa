"""The viewer: one page served by the API process (``GET /`` -> ``/viewer/``) that shows why a
knee got its maps: the radiograph with both knee ROIs and where their centres came from, the
synthesized femoral and tibial maps with their uncertainty, and the k neighbours the maps were
made of, with their similarity and weight.

Its HTML, JavaScript and CSS are package data (``mris/viewer/static/``): no build step, no CDN,
no script from another host. The page talks to the service through the same endpoints as any
client (``/synthesize``, with the bearer token when one is configured) plus two this module adds
for it: ``POST /preview`` (the radiograph as the service decoded it, as a small PNG, to draw the
ROIs on) and ``GET /neighbours/{id}`` (a database knee-visit's metadata and maps, for the
thumbnails). ``GET /viewer/config`` gives the page the colour maps and scales of
``mris.render``, so the page and the PNG answers show thickness on one scale.
"""
