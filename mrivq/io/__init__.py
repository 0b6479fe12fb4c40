"""Image files in and out: NIfTI/Analyze/DICOM reading, NIfTI/PNG/DICOM writing, folder listings, previews."""
