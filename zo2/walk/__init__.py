"""The walk: the model's own forward on the batch replicated once per part, every wrapped member running
part k under part k's weights (theta + s_k eps z_k).

:mod:`.driver` runs a batch's walks (member routing, forward context, calibration, statistics);
:mod:`.walk` is one walk's state; :mod:`.batching` splits and merges the parts' inputs and outputs;
:mod:`.scope` decides how much of the model exists perturbed at once; :mod:`.wrapping` replaces the
members' forwards; :mod:`.role` says which parts this process computes."""
