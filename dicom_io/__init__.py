"""DICOM input/output for radflag.

Everything DICOM lives here: the C-STORE listener (:mod:`dicom_io.scp`), the durable spool
(:mod:`dicom_io.spool`), reading and decoding instances (:mod:`dicom_io.reader`), image
selection (:mod:`dicom_io.select`), Structured Report construction (:mod:`dicom_io.sr`) and
the C-STORE client (:mod:`dicom_io.scu`). The package knows nothing about the database: the
daemon wires it to ``db`` through small protocols such as :class:`dicom_io.scp.InstanceSink`.
"""
