"""``medqc replay``: send recorded studies over DICOM the way a scanner does, and measure.

Each series goes over its own association (as a scanner sends a reconstruction), slices are paced at a
fixed rate, as fast as possible, or at the gaps recorded in the files (ContentTime / AcquisitionTime), and
several studies are sent at once (one sender thread per study, ``--associations`` at a time).

Every C-STORE round trip is timed. With ``--agent-url`` the agent's HTTP API is followed too (its
server-sent event stream and ``/api/series/{uid}``) to measure what a technologist experiences:
slice arrival → result latency, time to the first flag of a series, and last slice → series verdict.

Works against any storage SCP (DCMTK storescp, Orthanc, medqc agent) for the transport figures.
Exit status: 0 all sent; 1 something failed or was skipped (the summary says what); 2 usage error.

One module per job: ``plan`` (headers → studies, series, send times), ``send`` (associations and
C-STORE), ``watch`` (the agent's event stream and API), ``stats`` (the figures), ``report`` (summary and
plot), ``driver`` (``replay()``, the whole run) and ``cli`` (options).
"""
