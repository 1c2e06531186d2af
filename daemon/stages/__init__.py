"""The worker's stages, each a plain function or small class with typed hand-offs.

claim (:mod:`daemon.worker`) -> plan: read headers, select images per model
(:mod:`.plan`) -> prepare: decode + model input + preprocess, in a bounded pool
(:mod:`.prepare`) -> classify: the cross-study micro-batcher (:mod:`.infer`) -> verdict:
gate, aggregate (:mod:`.verdict`) -> heatmap of the key image, batched (:mod:`.infer`) ->
encode SR/SC and outputs (:mod:`.finish`) -> record + outbox, one transaction per study
(:func:`db.results.record_classification`). :class:`daemon.pipeline.StudyProcessor` wires
them and turns errors into outcomes (:mod:`.reading` says which errors are permanent).
"""
