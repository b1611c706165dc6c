"""What medqc reads from one CT slice, and how it decides.

- ``preprocess``: the one preprocessing function, HU slice → network input (training, export parity and the
  agent all call it);
- ``measures``: the classical measures of a slice (``measure(hu, info)``: metal, patient mask and field edges,
  lungs, bone, skull, with ``noise`` for σ at 2 mm and its levels, ``ring`` for ring contrast around the
  axis, ``airstreaks`` for motion streaks in the free air, ``image`` for the helpers they share);
- ``fusion``: the network's probabilities and those measures → the per-class scores the checks act on;
- ``anatomy``: the craniocaudal reference scale (landmarks) shared by synthesis, training, checks and the
  console.

Imports run one way: ``image`` ← ``noise``, ``ring``, ``airstreaks`` ← ``measures`` ← ``fusion``."""
