"""agent/ingest/receiver.py in-process with a pynetdicom SCU: private storage classes and compressed syntaxes are
accepted (a scanner's association never fails), the instance is on disk before success, C-ECHO answers."""

from __future__ import annotations

import socket

import pydicom

from medqc.agent.ingest.receiver import Receiver
from medqc.agent.ingest.spool import Spool
from medqc.config import load_config

PRIVATE_CLASS = "1.3.46.670589.11.0.0.12.4"  # a vendor's private storage SOP class
JPEG_LS = "1.2.840.10008.1.2.4.80"


def test_private_class_and_compressed_contexts_accepted(tmp_path, real_ct):
    from pynetdicom import AE

    seen = []
    spool = Spool(tmp_path / "spool", min_free_mb=0)

    def on_stored(path, t):
        seen.append((path, path.exists()))  # already durable when the pipeline hears of it

    rx = Receiver(load_config(None), spool, on_stored, port=0, bind="127.0.0.1").start()
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(PRIVATE_CLASS)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", JPEG_LS)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="ANY-TITLE")  # the called AE title is not enforced
        assert assoc.is_established
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted = {c.abstract_syntax: c.transfer_syntax[0] for c in assoc.accepted_contexts}
        assert accepted.get(PRIVATE_CLASS) and accepted.get("1.2.840.10008.5.1.4.1.1.2") == JPEG_LS
        assert assoc.send_c_echo().Status == 0x0000
        ds = pydicom.dcmread(real_ct / "S3010" / "I10")
        ds.SOPClassUID = PRIVATE_CLASS
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        rx.stop()
    assert len(seen) == 1 and seen[0][1]
    back = pydicom.dcmread(seen[0][0])
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.file_meta.MediaStorageSOPClassUID == PRIVATE_CLASS
