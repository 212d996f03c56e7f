"""Randomized smoothing, in the order a certificate is made.

* :mod:`~certkit.smoothing.statistics`: pure functions of vote counts (Clopper-Pearson bounds, radius,
  PREDICT's test) and the adaptive schedule's maths;
* :mod:`~certkit.smoothing.voter`: how the network is run (eval mode, speed options, logit checks);
* :mod:`~certkit.smoothing.samplers` and :mod:`~certkit.smoothing.stem`: noise per input or shared by a
  group, turned into vote counts;
* :mod:`~certkit.smoothing.smooth`: :class:`Smooth`, PREDICT and CERTIFY as in the paper;
* :mod:`~certkit.smoothing.runner`: a whole dataset into a result file, with resume and shards.
"""
