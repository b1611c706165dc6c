"""Where findings go: stdout JSON lines, the SQLite store, webhooks, DICOM SR, ... (one module each)."""

from medqc.agent.sinks.base import Sink, SinkThread

__all__ = ["Sink", "SinkThread"]
