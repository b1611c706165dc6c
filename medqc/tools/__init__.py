"""Tools that measure medqc from the outside, as a scanner and a site would see it: ``replay`` (send recorded
studies over DICOM at scanner speed and time the answers) and ``bench`` (ingest, inference and end to end,
side by side)."""
