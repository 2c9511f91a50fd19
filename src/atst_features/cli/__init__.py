"""The command-line tools, one module per family:

- :mod:`.embed`: ``atst-embed`` (its pipeline in :mod:`.pipeline`, ``--jobs`` in :mod:`.jobs`);
- :mod:`.tag`: ``atst-tag``; :mod:`.detect`: ``atst-detect``;
- :mod:`.tools`: ``atst-convert``, ``atst-export``, ``atst-models`` and ``atst-score``;
- :mod:`.common` (errors, inputs, options) and :mod:`.runs` (decoding ahead, per-file reporting,
  progress) serve them all.

Expected failures (a bad file, no network, a refused overwrite) end with one ``Error: ...`` line
and exit code 1 (2 for usage errors), never a traceback; a bug keeps its traceback.
"""
