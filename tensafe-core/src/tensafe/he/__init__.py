"""Parts of HE-LoRA (:mod:`tensafe.he_lora`) that stand on their own.

``state``: the key owner's secret state, sealed at rest under a passphrase;
``hiding``: the masks' distributions and the statistical bound they give;
``pool``: encrypted masks made ahead of time in worker processes.
"""
