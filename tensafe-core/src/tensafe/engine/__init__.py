"""The engine: the one place that turns a configuration into work.

Small modules, each one concern, layered with no import cycle (each imports
only those above it in this list):

* :mod:`~tensafe.engine.ledger`: the privacy spend and the typed :class:`PrivacyCertificate`;
* :mod:`~tensafe.engine.report`: the run report and its text rendering;
* :mod:`~tensafe.engine.run`: a run's data (the protected set, the held-out set, probes);
* :mod:`~tensafe.engine.gate`: step admission and the release gate (everything that leaves a run);
* :mod:`~tensafe.engine.state`: checkpoints (backend state and spend, sealed together);
* :mod:`~tensafe.engine.packaging`: TGSP packages;
* :mod:`~tensafe.engine.inference`: adapters, packages and HE-LoRA for generation;
* :mod:`~tensafe.engine.loop`: sampling, micro-batches, the step and the run.

:class:`tensafe.orchestrator.TenSafeOrchestrator` is the façade over them.
"""
