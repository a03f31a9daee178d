"""HE-LoRA's parts, one concern each; :mod:`tensafe.he_lora` is the public face that re-exports them.

``packing``: slots, layouts and scales; ``frames``: the versioned wire format;
``messages``: requests, responses and transports; ``key_owner`` and
``evaluator``: the two parties; ``state``: the key owner's secret state, sealed
at rest; ``hiding``: the masks' distributions and the statistical bound they
give; ``pool``: encrypted masks made ahead of time in worker processes.
"""
