"""Fetch a dataset described by a card into ``<root>/<name>/`` and write its ``manifest.csv``.

What it guarantees (each has a test in ``tests/datasets/test_fetch.py``):

- **Streamed, hashed, resumable downloads.** Each file streams into ``.mrivq/downloads/<file>.part``
  while md5/sha256 are computed; no second read of a multi-GB file. A dropped connection is resumed
  with an HTTP ``Range`` request inside the same call; a rerun after a kill resumes the ``.part`` file.
  On such a rerun the existing partial is hashed once from disk (hash objects cannot be persisted
  portably, and reading N local bytes is far cheaper than downloading them again). A server that
  ignores ``Range`` (answers 200) is handled by truncating and starting over.
- **Retries** with exponential backoff for transient failures (resets, timeouts, short reads, 5xx,
  429); a 4xx, or retries used up, raise a one-line :class:`MrivqError` naming the URL.
- **Verify before extract.** Size and checksums are checked before anything is unpacked; a mismatch
  removes the downloaded file and raises :class:`ChecksumError`, leaving no data files behind.
- **Atomic placement.** Each part is unpacked (:func:`mrivq.datasets.archive.safe_extract`) into
  ``<root>/<name>/.staging-XXXX/``, offered to the layout's optional ``prepare``, then renamed into place;
  its completion marker ``.mrivq/done/<file>.json`` is written last. A killed fetch leaves at most a
  staging folder, which the next run removes. ``manifest.csv`` is written with temp + ``os.replace``.
- **Disk use.** Archives are deleted once extracted (IXI is 17 GB); non-archive files (``.nii.gz``,
  ``.xls``, MNIST's ``.gz``) are moved, not copied, into the dataset folder. ``.mrivq/downloads/`` thus
  only ever holds unfinished ``.part`` files or verified files not yet placed.
- **Idempotent and concurrent-safe.** A second fetch of a complete selection makes no request at all;
  two fetches of one dataset serialise on the file lock ``.mrivq/lock``. Nothing complete is ever
  deleted or overwritten on an error.

Where a fetched file lands: an archive's members keep their paths relative to ``<root>/<name>/``; a
non-archive file lands at ``<root>/<name>/<filename>``; a folder given with ``--from`` to a manual card
lands at ``<root>/<name>/<folder name>/``; the builtin phantom writes at ``<root>/<name>/`` directly.

Modules: :mod:`~mrivq.datasets.fetch.job` (:func:`~mrivq.datasets.fetch.job.fetch` and the per-dataset
orchestration), :mod:`~mrivq.datasets.fetch.download` (HTTP with resume and retries),
:mod:`~mrivq.datasets.fetch.verify` (hashing and checksum checks), :mod:`~mrivq.datasets.fetch.place`
(staging and atomic placement), :mod:`~mrivq.datasets.fetch.state` (markers, leftovers, ``manifest.csv``,
``FetchResult``) and :mod:`~mrivq.datasets.fetch.messages` (modality selection, help texts).
"""
