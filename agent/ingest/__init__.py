"""Ingest: instances in, durable on disk, then acknowledged.

``receiver`` (the DICOM C-STORE SCP, with ``mpps`` for MPPS N-CREATE / N-SET and ``dulwait`` for
pynetdicom's polling waits), ``receiver_proc`` (the receiver in a process of its own), ``access`` (calling
AE titles, source addresses, TLS), ``watch`` (drop folders) and ``spool`` (fsync + atomic rename before
"success"; the refusal state when its disk runs low or writes fail).
"""
