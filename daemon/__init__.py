"""radflag's daemon: settings, CLI, process lifecycle, worker and scheduled jobs.

The only package that wires ``dicom_io``, ``model`` and ``db`` together.
"""
