"""What medqc reads from one CT slice, and how it decides.

- ``preprocess``: the network input's parameters and the slice geometry the host computes for it (which
  stored rows and columns each input row and column reads, with which weights); the pixel work itself runs
  inside the exported model (``medqc.models.slice_input``), for training, export parity and the agent alike;
- ``measures``: the classical measures of a slice (``measure(hu, info)``: metal, patient mask and field edges,
  lungs, bone, skull, with ``noise`` for σ at 2 mm and its levels, ``ring`` for ring contrast around the
  axis, ``airstreaks`` for motion streaks in the free air, ``image`` for the helpers they share);
- ``fusion``: the network's probabilities and those measures → the per-class scores the checks act on;
- ``anatomy``: the craniocaudal reference scale (landmarks) shared by synthesis, training, checks and the
  console.

Imports run one way: ``image`` ← ``noise``, ``ring``, ``airstreaks`` ← ``measures`` ← ``fusion``."""
