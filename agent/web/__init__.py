"""The agent's HTTP side: ``http`` (the one server: the API, server-sent events, the console's routes),
``console`` (the technologist's live page, its thumbnails sink; assets in ``static/``) and ``figure`` (the
per-series PNG of ``medqc analyze --plot``)."""
