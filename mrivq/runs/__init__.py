"""Run folders: their files (:mod:`~mrivq.runs.folder`) and a trained run loaded for use (:mod:`~mrivq.runs.run`)."""
