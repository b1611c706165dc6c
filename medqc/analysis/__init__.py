"""What medqc reads from one CT slice: the network input (``preprocess``), the classical measures
(``measures``, with ``airstreaks``) and their fusion with the network, and the reference body scale
(``anatomy``)."""
