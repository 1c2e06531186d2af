"""radflag's database: schema, study state machine, work queue and audit log.

The database is the single source of truth and the work queue (see ``ARCHITECTURE.md``).
Nothing in this package imports pydicom, pynetdicom or torch.
"""
